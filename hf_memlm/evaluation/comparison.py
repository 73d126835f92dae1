"""Perplexity by segment position for several trained models side by side, averaged over training seeds.

The question a language-modelling run has to answer is not "does this model do worse with its memory
switched off" (its weights co-adapted with the memory) but "is a model with memory better than the same
model trained without it, at equal compute". So every model in the comparison is trained separately, on
the same examples, steps and schedule, and scored here on the same held-out documents:

* a memory model (`MemLMForCausalLM`): segments of L tokens, each reading what earlier segments wrote;
* a model without memory reading the same text in windows of `window` tokens (`window = L`: the
  equal-compute baseline; `window = 2L`: what a twice longer attention window buys).

Predictions are bucketed by the segment of L tokens they are made in (the logits at position q, which
predict token q + 1, belong to segment q // L), so every model is scored on exactly the same predictions.
Per seed, perplexity = exp(mean NLL); across seeds the report gives the mean and the spread (min, max),
and the gain of each model over the reference: 100 * (1 - perplexity / reference perplexity), per seed,
then averaged.
"""

from __future__ import annotations

import math

import torch

from .conditions import pad_batch, shift_labels, streamed_predictions


@torch.no_grad()
def segment_nll(
    model,
    rows: list[list[int]],
    segment_length: int,
    *,
    window: int | None = None,
    use_memory: bool = True,
    batch_size: int = 8,
) -> tuple[list[float], list[int]]:
    """Summed negative log-likelihood and prediction count per segment of `segment_length` tokens.

    model: a `MemLMForCausalLM` (run segment by segment with its memory state carried, or inside
        `memory_disabled()` when `use_memory` is False), or any causal LM when `window` is given: it then
        reads each row in consecutive windows of `window` tokens, each on its own.
    rows: token ids, all of one length (e.g. from `pack_documents`).
    Returns (nll sums, counts), one entry per segment; the last token of a row is predicted by nothing.
    """
    if not rows:
        raise ValueError("segment_nll: no rows to score.")
    length = len(rows[0])
    if any(len(row) != length for row in rows):
        raise ValueError("segment_nll: every row must have the same length (pack them with pack_documents).")
    if length < 2:
        raise ValueError("segment_nll: a row needs at least 2 tokens to predict anything.")
    num_segments = math.ceil(length / segment_length)
    sums = torch.zeros(num_segments, dtype=torch.float64)
    counts = torch.zeros(num_segments, dtype=torch.float64)
    segment_of = torch.arange(length - 1) // segment_length
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(rows), batch_size):
            ids, mask = pad_batch(rows[first : first + batch_size], 0, device)
            if window is None:
                targets = shift_labels(ids)
                _, nll = streamed_predictions(model, ids, mask, targets, use_memory=use_memory)
                nll = nll[:, :-1]
            else:
                nll = _window_nll(model, ids, window)
            sums += torch.bincount(segment_of, weights=nll.sum(0).double().cpu(), minlength=num_segments)
            counts += torch.bincount(segment_of, minlength=num_segments).double() * ids.shape[0]
    finally:
        model.train(was_training)
    return sums.tolist(), [int(c) for c in counts.tolist()]


def _window_nll(model, ids: torch.Tensor, window: int) -> torch.Tensor:
    """NLL (B, T - 1) of token q + 1 given the window of `window` tokens that holds position q."""
    batch, length = ids.shape
    logits = [model(input_ids=ids[:, start : start + window]).logits.float() for start in range(0, length, window)]
    logits = torch.cat(logits, dim=1)[:, :-1]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(batch, length - 1)


def compare_perplexity(
    measurements: dict[str, dict],
    *,
    segment_length: int,
    num_examples: int,
    reference: str,
    beyond_segment: int = 4,
) -> dict:
    """Combine per-seed `segment_nll` results of several models into one JSON-ready comparison.

    measurements: name -> {"label": str, "description": str, "seeds": [int, ...],
        "nll": [[per-segment NLL sums] per seed], "counts": [per-segment counts]}.
    reference: the name the gains are measured against (the equal-compute model without memory).
    beyond_segment: the summary `beyond` pools segments with index >= this (0-based: 4 = from the 5th
        segment on, where memory holds at least 4 segments).
    """
    if reference not in measurements:
        raise ValueError(f"compare_perplexity: the reference {reference!r} is not among {sorted(measurements)}.")
    names = list(measurements)
    counts = measurements[reference]["counts"]
    num_segments = len(counts)
    per_seed = {name: _per_seed_perplexity(measurements[name], range(num_segments)) for name in names}
    by_segment = []
    for segment in range(num_segments):
        by_segment.append(
            {
                "segment": segment,
                "tokens": counts[segment],
                **_summarise({name: [seed[segment] for seed in per_seed[name]] for name in names}, reference),
            }
        )
    pooled = range(beyond_segment, num_segments)
    beyond = {
        "from_segment": beyond_segment,
        "tokens": sum(counts[s] for s in pooled),
        **_summarise({name: _pooled_perplexity(measurements[name], pooled) for name in names}, reference),
    }
    return {
        "kind": "comparison",
        "task": "perplexity",
        "segment_length": segment_length,
        "num_segments": num_segments,
        "num_examples": num_examples,
        "reference": reference,
        "models": {
            name: {
                "label": m["label"],
                "description": m["description"],
                "seeds": list(m["seeds"]),
                "perplexity_by_seed": per_seed[name],
            }
            for name, m in measurements.items()
        },
        "method": (
            "teacher-forced NLL of the same predictions for every model; the prediction made at position q "
            "counts for segment q // L; per seed perplexity = exp(mean NLL); mean and (min, max) over seeds; "
            "gain = 100 * (1 - perplexity / reference perplexity), per seed, then averaged"
        ),
        "by_segment": by_segment,
        "beyond": beyond,
    }


def _per_seed_perplexity(measurement: dict, segments) -> list[list[float | None]]:
    counts = measurement["counts"]
    return [[math.exp(sums[s] / counts[s]) if counts[s] else None for s in segments] for sums in measurement["nll"]]


def _pooled_perplexity(measurement: dict, segments) -> list[float | None]:
    total = sum(measurement["counts"][s] for s in segments)
    if not total:
        return [None for _ in measurement["nll"]]
    return [math.exp(sum(sums[s] for s in segments) / total) for sums in measurement["nll"]]


def _summarise(values: dict[str, list], reference: str) -> dict:
    """Mean and (min, max) perplexity per model over seeds, and its gain (%) over the reference."""
    perplexity, spread, gain, gain_spread = {}, {}, {}, {}
    base = values[reference]
    for name, seeds in values.items():
        if any(v is None for v in seeds):
            perplexity[name] = spread[name] = gain[name] = gain_spread[name] = None
            continue
        perplexity[name] = sum(seeds) / len(seeds)
        spread[name] = [min(seeds), max(seeds)]
        # seeds are paired by position: seed k of a model against seed k of the reference
        gains = [100.0 * (1.0 - v / b) for v, b in zip(seeds, base)]
        gain[name] = sum(gains) / len(gains)
        gain_spread[name] = [min(gains), max(gains)]
    return {"perplexity": perplexity, "spread": spread, "gain_percent": gain, "gain_spread": gain_spread}


__all__ = ["compare_perplexity", "segment_nll"]


# -- report ----------------------------------------------------------------------------------------------
def comparison_markdown(results: dict) -> str:
    """The comparison as Markdown: perplexity per model by segment (mean over seeds, min–max), and gains."""
    models = results["models"]
    names = list(models)
    reference = results["reference"]
    others = [name for name in names if name != reference]
    seeds = models[reference]["seeds"]
    length = results["segment_length"]
    lines = [
        (
            f"# Perplexity by segment position: {len(names)} models, {results['num_examples']} held-out examples "
            f"of {results['num_segments']} segments of {length} tokens, {len(seeds)} training seed(s) "
            f"({', '.join(map(str, seeds))})"
        ),
        "",
        "Perplexity: mean over seeds (min–max). Gain: % lower perplexity than "
        f"**{models[reference]['label']}**, mean over seeds (min–max).",
        "",
        "| segment | tokens | "
        + " | ".join(models[n]["label"] for n in names)
        + " | "
        + " | ".join(f"gain: {models[n]['label']}" for n in others)
        + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in names + others) + " |",
    ]
    beyond = results["beyond"]
    rows = [(str(entry["segment"]), entry) for entry in results["by_segment"]]
    rows.append((f"**≥ {beyond['from_segment']}**", beyond))
    for label, entry in rows:
        cells = [_with_spread(entry["perplexity"][n], entry["spread"][n], 3) for n in names]
        gains = [_with_spread(entry["gain_percent"][n], entry["gain_spread"][n], 1, "%") for n in others]
        lines.append(f"| {label} | {entry['tokens']} | " + " | ".join(cells + gains) + " |")
    lines += [
        "",
        f"Segment s holds the predictions made at positions s*{length} .. (s+1)*{length} - 1; the row "
        f"**≥ {beyond['from_segment']}** pools segments {beyond['from_segment']} and later.",
        "",
        "Models:",
        *[f"- **{m['label']}**: {m['description']}" for m in models.values()],
        "",
        f"Method: {results['method']}.",
    ]
    return "\n".join(lines) + "\n"


def _with_spread(value, spread, digits: int, unit: str = "") -> str:
    if value is None:
        return "–"
    if len(set(spread)) == 1:
        return f"{value:.{digits}f}{unit}"
    return f"{value:.{digits}f}{unit} ({spread[0]:.{digits}f}–{spread[1]:.{digits}f})"


_COLOURS = ("#1f77b4", "#7f7f7f", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


def plot_comparison(plt, results: dict):
    """Left: perplexity by segment per model (mean line, min–max band). Right: gain over the reference."""
    models = results["models"]
    reference = results["reference"]
    entries = [e for e in results["by_segment"] if e["tokens"]]
    x = [e["segment"] for e in entries]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for colour, (name, model) in zip(_COLOURS, models.items()):
        mean = [e["perplexity"][name] for e in entries]
        left.plot(x, mean, marker="o", markersize=4, linewidth=2, color=colour, label=model["label"])
        left.fill_between(
            x,
            [e["spread"][name][0] for e in entries],
            [e["spread"][name][1] for e in entries],
            color=colour,
            alpha=0.15,
            linewidth=0,
        )
        if name == reference:
            continue
        gains = [e["gain_percent"][name] for e in entries]
        low = [g - e["gain_spread"][name][0] for g, e in zip(gains, entries)]
        high = [e["gain_spread"][name][1] - g for g, e in zip(gains, entries)]
        right.errorbar(
            x, gains, yerr=[low, high], marker="o", markersize=4, capsize=3, color=colour, label=model["label"]
        )
    left.set_title("perplexity on held-out text by segment position")
    left.set_xlabel(f"segment index (segments of {results['segment_length']} tokens)")
    left.set_ylabel("perplexity (mean over seeds, band: min–max)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.axhline(0, color="black", linewidth=0.8)
    right.set_title(f"gain over {models[reference]['label']} (%)")
    right.set_xlabel("segment index")
    right.set_ylabel("% lower perplexity (bars: min–max over seeds)")
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    seeds = len(models[reference]["seeds"])
    figure.suptitle(
        f"{results['num_examples']} held-out examples of {results['num_segments']} segments, {seeds} seed(s)",
        fontsize=11,
    )
    return figure
