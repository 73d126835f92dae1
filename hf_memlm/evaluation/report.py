"""Reports of evaluation results: JSON (everything), a Markdown table, and a PNG plot.

Retrieval: rows are distance buckets in segments (with the token distances they hold), columns the
conditions (with memory / memory disabled / base model), plus counts and the chance level.
Perplexity: rows are segment positions, columns perplexity with memory / memory disabled and the gap.
Comparison (several trained models, `comparison.py`): rows are segment positions, columns the models.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path


def environment() -> dict:
    """What a figure depends on beyond its config: the library versions, torch's threads, the CPU kernels torch
    dispatches to (AVX2 and AVX-512 kernels round differently, which is enough to change what a training run
    learns), the CPU, the GPU if any, Python and the platform."""
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def reading_dtype(name: str):
    """The torch dtype called `name`; "auto": bfloat16 where it is computed natively (a GPU, or a CPU whose kernels
    torch runs with AVX-512), else float32. On a CPU with AVX2 only, bfloat16 matmuls are emulated: SmolLM2-135M's
    forward runs several times slower than in float32 (`python scripts/dtype_speed.py`)."""
    import torch

    if name == "auto":
        native = torch.cuda.is_available() or "AVX512" in torch.backends.cpu.get_cpu_capability()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, name)


def environment_line(env: dict) -> str:
    """One Markdown line naming the environment of a report (`environment()`)."""
    threads = env["torch_threads"]
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    return (
        f"Environment: torch {env['torch']} ({env['cpu_capability']} kernels, {threads} thread"
        f"{'' if threads == 1 else 's'}{gpu}), transformers {env['transformers']}, Python {env['python']}, "
        f"{env['platform']}, CPU {env['cpu'] or 'unknown'}."
    )


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def write_report(results: dict, output_dir, name: str | None = None) -> dict[str, Path]:
    """Write `<name>.json`, `<name>.md` and `<name>.png` (name: the task) into `output_dir`; return the paths.
    The results get the `environment` they were measured in (this process's, unless they carry one)."""
    results.setdefault("environment", environment())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    name = name or results.get("task") or results["kind"]
    paths = {
        "json": output_dir / f"{name}.json",
        "markdown": output_dir / f"{name}.md",
        "plot": output_dir / f"{name}.png",
    }
    paths["json"].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    paths["markdown"].write_text(format_markdown(results), encoding="utf-8")
    plot_results(results, paths["plot"])
    return paths


def format_markdown(results: dict) -> str:
    """The results as Markdown: a heading, the table(s), what each condition saw, and the environment."""
    if results["kind"] == "chat_passkey":  # generation-scored, distances in tokens: its own layout
        from .chat_passkey import format_chat_passkey

        text = format_chat_passkey(results)
    elif results["kind"] == "comparison":  # several trained models side by side: its own layout
        from .comparison import comparison_markdown

        text = comparison_markdown(results)
    elif results["kind"] == "suite":  # scores by task and length: its own layout
        from .suite import format_suite

        text = format_suite(results)
    else:
        text = _single_model_markdown(results)
    if results.get("environment"):
        text += "\n" + environment_line(results["environment"]) + "\n"
    return text


def _single_model_markdown(results: dict) -> str:
    if results["kind"] == "retrieval":
        body = _retrieval_markdown(results)
    elif results["kind"] == "perplexity":
        body = _perplexity_markdown(results)
    else:
        raise ValueError(f"unknown results kind {results['kind']!r}; expected 'retrieval' or 'perplexity'.")
    model = results.get("model", {})
    lines = [
        (
            f"# {results['task']}: {model.get('memory_type', '?')} memory on a "
            f"{model.get('base_model_type', '?')} base, "
            f"segment length {results['segment_length']}"
        ),
        "",
        body,
        "",
        "Conditions:",
        *[f"- **{results['condition_labels'][c]}**: {d}" for c, d in results["condition_descriptions"].items()],
        "",
        f"Method: {results['method']}.",
    ]
    check = results.get("generate_check")
    if check:
        lines.append(
            f"Greedy generation check: {check['agree']} of {check['checked']} answers agree with the "
            "teacher-forced exact match."
        )
    return "\n".join(lines) + "\n"


def _retrieval_markdown(results: dict) -> str:
    conditions = results["conditions"]
    labels = [results["condition_labels"][c] for c in conditions]
    chance = results["chance"]
    parts = []
    for metric, title, chance_value in (
        ("exact_match", "Exact match of the answer", chance.get("exact_match")),
        ("token_accuracy", "Accuracy per answer token", chance.get("token_accuracy")),
    ):
        rows = [
            f"**{title}** by distance ({results['num_answers']} answers in {results['num_examples']} examples)",
            "",
            "| distance (segments) | distance (tokens) | answers | tokens | " + " | ".join(labels) + " |",
            "| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in labels) + " |",
        ]
        for bucket in results["by_distance_segments"]:
            tokens = (
                f"{bucket['tokens_min']}–{bucket['tokens_max']}"
                if bucket["tokens_min"] != bucket["tokens_max"]
                else str(bucket["tokens_min"])
            )
            rows.append(
                f"| {bucket['distance_segments']} | {tokens} | {bucket['answers']} | {bucket['tokens']} | "
                + " | ".join(_fmt(bucket["metrics"][c][metric]) for c in conditions)
                + " |"
            )
        overall = results["overall"]
        rows.append(
            f"| **all** | | {overall['answers']} | {overall['tokens']} | "
            + " | ".join(f"**{_fmt(overall['metrics'][c][metric])}**" for c in conditions)
            + " |"
        )
        if chance_value is not None:
            rows.append("| chance | | | | " + " | ".join(_fmt(chance_value) for _ in conditions) + " |")
        parts.append("\n".join(rows))
    parts.append(f"Chance: {chance.get('note', '')}.")
    return "\n\n".join(parts)


def _perplexity_markdown(results: dict) -> str:
    conditions = results["conditions"]
    labels = [results["condition_labels"][c] for c in conditions]
    with_gap = "memory_disabled" in conditions
    header = (
        "| segment | positions predicted | tokens scored | " + " | ".join(labels) + (" | gap |" if with_gap else " |")
    )
    rows = [
        (
            f"**Perplexity by segment position** ({results['num_examples']} examples of "
            f"{results['num_segments']} segments)"
        ),
        "",
        header,
        "| ---: | ---: | ---: | " + " | ".join("---:" for _ in labels) + (" | ---: |" if with_gap else " |"),
    ]
    for entry in results["by_segment"] + [dict(results["overall"], segment="**all**", tokens_from=None)]:
        span = f"{entry['tokens_from']}–{entry['tokens_to']}" if entry.get("tokens_from") is not None else ""
        cells = [_fmt(entry["perplexity"][c], 3) for c in conditions]
        gap = f" | {_fmt(entry['gap'], 3, signed=True)} |" if with_gap else " |"
        rows.append(f"| {entry['segment']} | {span} | {entry['tokens']} | " + " | ".join(cells) + gap)
    rows.append("")
    rows.append("Gap = perplexity with memory disabled minus with memory (positive: memory helps).")
    by_position = [b for b in results.get("by_position_in_segment", []) if b["tokens"]]
    if by_position:
        rows += [
            "",
            "**By position inside the segment** (segments >= 1, where there is memory to read)",
            "",
            "| positions | tokens scored | " + " | ".join(labels) + (" | gap |" if with_gap else " |"),
            "| ---: | ---: | " + " | ".join("---:" for _ in labels) + (" | ---: |" if with_gap else " |"),
        ]
        for entry in by_position:
            cells = [_fmt(entry["perplexity"][c], 3) for c in conditions]
            gap = f" | {_fmt(entry['gap'], 3, signed=True)} |" if with_gap else " |"
            span = f"{entry['positions_from']}–{entry['positions_to']}"
            rows.append(f"| {span} | {entry['tokens']} | " + " | ".join(cells) + gap)
    return "\n".join(rows)


def _fmt(value, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "–"
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.1e}"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


# -- plots ----------------------------------------------------------------------------------------------
_STYLE = {
    "memory": {"color": "#1f77b4", "marker": "o"},
    "memory_disabled": {"color": "#ff7f0e", "marker": "s"},
    "base_model": {"color": "#2ca02c", "marker": "^"},
}


def plot_results(results: dict, path) -> Path:
    """Retrieval: accuracy vs distance (one line per condition, chance dashed); perplexity: by segment."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    if results["kind"] == "chat_passkey":  # one curve by distance in tokens: its own figure
        from .chat_passkey import plot_chat_passkey

        return plot_chat_passkey(results, path)
    if results["kind"] == "suite":
        from .suite import plot_suite

        return plot_suite(results, path)
    if results["kind"] == "comparison":
        from .comparison import plot_comparison

        figure = plot_comparison(plt, results)
    elif results["kind"] == "retrieval":
        figure = _plot_retrieval(plt, results)
    elif results["kind"] == "perplexity":
        figure = _plot_perplexity(plt, results)
    else:
        raise ValueError(f"unknown results kind {results['kind']!r}; expected 'retrieval' or 'perplexity'.")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _plot_retrieval(plt, results: dict):
    buckets = results["by_distance_segments"]
    x = [b["distance_segments"] for b in buckets]
    ticks = [f"{b['distance_segments']}\n({_token_range(b)})\nn={b['answers']}" for b in buckets]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    # distances spanning decades (16k to 1M tokens) would crowd the short ones together on a linear axis
    logarithmic = min(x) > 0 and max(x) >= 16 * min(x)
    for axis, metric, title in (
        (axes[0], "exact_match", "exact match of the answer"),
        (axes[1], "token_accuracy", "accuracy per answer token"),
    ):
        for number, condition in enumerate(results["conditions"]):
            y = [b["metrics"][condition][metric] for b in buckets]
            # a small sideways shift keeps equal curves (common at chance) visible
            dodge = _dodge(number, len(results["conditions"]))
            shifted = [value * (1 + dodge / 4) if logarithmic else value + dodge for value in x]
            axis.plot(
                shifted,
                y,
                label=results["condition_labels"][condition],
                linewidth=2,
                markersize=6,
                alpha=0.9,
                **_STYLE[condition],
            )
        chance = results["chance"].get(metric)
        if chance is not None:
            axis.axhline(chance, color="grey", linestyle="--", linewidth=1.2, label=f"chance ({_fmt(chance)})")
        axis.set_ylim(-0.03, 1.03)
        axis.set_title(title)
        axis.set_xlabel("distance in segments (tokens), answers")
        shown = _thin(list(range(len(x))))
        if logarithmic:
            axis.set_xscale("log")
            axis.minorticks_off()
        axis.set_xticks([x[i] for i in shown])
        axis.set_xticklabels([ticks[i] for i in shown], fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="best", fontsize=8)
    model = results.get("model", {})
    figure.suptitle(
        f"{results['task']}: {model.get('memory_type', '?')} memory, segment length {results['segment_length']}, "
        f"{results['num_answers']} answers",
        fontsize=11,
    )
    figure.tight_layout()  # the label widths are final only in the final layout
    for axis in axes:
        _stagger_tick_labels(figure, axis)
    return figure


def _stagger_tick_labels(figure, axis, gap: float = 4.0) -> None:
    """Lower a tick label below its neighbours' where it would print over one (distances close together on a
    log axis, e.g. 12 and 16 segments): each label takes the highest row where it overlaps no earlier label."""
    renderer = figure.canvas.get_renderer()
    ticks = [tick for tick in axis.xaxis.get_major_ticks() if tick.label1.get_text()]
    boxes = [tick.label1.get_window_extent(renderer) for tick in ticks]
    rows: list[float] = []  # per row, the right edge of its last label (pixels)
    for tick, box in zip(ticks, boxes):
        row = next((r for r, right in enumerate(rows) if box.x0 >= right + gap), len(rows))
        rows[row : row + 1] = [box.x1]
        if row:
            tick.set_pad(tick.get_pad() + row * (box.height + gap) * 72 / figure.dpi)


def _plot_perplexity(plt, results: dict):
    entries = [e for e in results["by_segment"] if e["tokens"]]
    x = [e["segment"] for e in entries]
    with_gap = "memory_disabled" in results["conditions"]
    figure, axes = plt.subplots(1, 2 if with_gap else 1, figsize=(11 if with_gap else 6, 4.2), squeeze=False)
    axis = axes[0][0]
    for condition in results["conditions"]:
        axis.plot(
            x,
            [e["perplexity"][condition] for e in entries],
            label=results["condition_labels"][condition],
            linewidth=2,
            markersize=5,
            **_STYLE[condition],
        )
    axis.set_title("perplexity by segment position")
    axis.set_xlabel(f"segment index (segments of {results['segment_length']} tokens)")
    axis.set_ylabel("perplexity")
    axis.set_xticks(_thin(x))
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    if with_gap:
        gap_axis = axes[0][1]
        gaps = [e["gap"] for e in entries]
        gap_axis.bar(x, gaps, color=["#1f77b4" if g >= 0 else "#d62728" for g in gaps])
        gap_axis.axhline(0, color="black", linewidth=0.8)
        gap_axis.set_title("gap = disabled − with memory (> 0: memory helps)")
        gap_axis.set_xlabel("segment index")
        gap_axis.set_ylabel("perplexity difference")
        gap_axis.set_xticks(_thin(x))
        gap_axis.grid(alpha=0.3, axis="y")
    model = results.get("model", {})
    figure.suptitle(
        f"perplexity: {model.get('memory_type', '?')} memory, {results['num_examples']} examples of "
        f"{results['num_segments']} segments",
        fontsize=11,
    )
    return figure


def _token_range(bucket: dict) -> str:
    low, high = bucket["tokens_min"], bucket["tokens_max"]
    return str(low) if low == high else f"{low}–{high}"


def _dodge(number: int, count: int, width: float = 0.08) -> float:
    return (number - (count - 1) / 2) * width


def _thin(values: list, most: int = 12) -> list:
    """At most `most` tick positions, evenly spaced, always keeping the first and last."""
    if len(values) <= most:
        return values
    indices = sorted({round(i * (len(values) - 1) / (most - 1)) for i in range(most)})
    return [values[i] for i in indices]
