"""Shared pieces of the cost benchmarks: the issue's model, interleaved timing, JSON/Markdown output.

Every benchmark builds its models through the public API only (`MemLMConfig` defaults for the memory
settings, `MemLMForCausalLM.from_base`) and times the base and the memory model in one process.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a shared, loaded machine a spinning thread burns the
# CPU time of the one it waits for, and CPU-time figures would count the spinning as work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import gc
import json
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_memlm
from hf_memlm import MemLMForCausalLM
from hf_memlm.recipes.defaults import tiny_llama_config

RESULTS = Path(__file__).resolve().parent / "results"


def base_config(hidden_size: int = 256, num_layers: int = 4, segment_length: int = 256) -> LlamaConfig:
    """The benchmark base: the embedded byte-vocabulary Llama, `hidden_size` wide, `num_layers` deep."""
    return tiny_llama_config(hidden_size=hidden_size, num_layers=num_layers, max_positions=segment_length)


def add_base_size_arguments(parser) -> None:
    """`--hidden` / `--layers`: the base's width and depth, for figures at another size than the issue's."""
    parser.add_argument("--hidden", type=int, default=None, help="base hidden size (default 256; quick 64)")
    parser.add_argument("--layers", type=int, default=None, help="base decoder layers (default 4; quick 2)")


def base_size(args) -> tuple[int, int, int]:
    """(hidden size, layers, segment length) of the benchmark base: the issue's Llama 256 wide with 4 layers and
    segments of 256 (quick: 64 wide, 2 layers, segments of 32), unless `--hidden` / `--layers` say otherwise."""
    hidden, layers, segment = (64, 2, 32) if args.quick else (256, 4, 256)
    hidden = hidden if args.hidden is None else args.hidden
    layers = layers if args.layers is None else args.layers
    if hidden % 4 or hidden <= 0 or layers <= 0:
        raise ValueError(
            f"--hidden must be a positive multiple of 4 (4 heads) and --layers positive, got {hidden}, {layers}."
        )
    return hidden, layers, segment


def build_models(config: LlamaConfig, segment_length: int, kinds=("kv", "slot"), seed: int = 0, **settings):
    """The base model and, per memory kind, a memory model around an identical copy of it.

    Only `memory_type` and `segment_length` are set: every other memory setting is `MemLMConfig`'s default
    (memory beside the middle layer), unless `settings` names some. The memory output projection starts at zero, so the memory models
    compute what the base computes, at the memory's cost.
    """
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config).eval()
    models = {"base": base}
    for kind in kinds:
        copy = AutoModelForCausalLM.from_config(config)
        copy.load_state_dict(base.state_dict())
        models[kind] = MemLMForCausalLM.from_base(copy, memory_type=kind, segment_length=segment_length, **settings)
        models[kind] = models[kind].eval()
    return models


def text_tokens(count: int, batch: int = 1) -> torch.Tensor:
    """`count` byte tokens per row from the bundled public-domain text (repeated), rows at different offsets."""
    from hf_memlm.data import default_text

    data = torch.tensor(list(default_text().encode("utf-8")), dtype=torch.long)
    reps = (count * batch) // data.numel() + 2
    data = data.repeat(reps)
    stride = data.numel() // (batch + 1)
    return torch.stack([data[row * stride : row * stride + count] for row in range(batch)])


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    gc.collect()
    wall, cpu = time.perf_counter(), cpu_seconds()
    fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def interleaved(runs: dict, repeats: int, warmup: int = 1) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time each callable in `runs` `repeats` times, round-robin (base, memory, base, ...), after warm-up.

    Returns (wall seconds, CPU seconds) per run and name. Interleaving keeps a shared machine's load
    changes from favouring one model over another; CPU time is what the run itself consumed, which a
    loaded machine disturbs far less than wall time (waiting for a core is not counted).
    """
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds, cpu_time = timed(fn)
            wall[name].append(seconds)
            cpu[name].append(cpu_time)
    return wall, cpu


def median(values) -> float:
    return statistics.median(values)


def environment() -> dict:
    """What the figures depend on: CPU model, torch threads, versions, and the machine's load."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "")
    except OSError:
        cpu = platform.processor()
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        load = []
    try:
        import faiss

        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
    return {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "hf_memlm": hf_memlm.__version__,
        "faiss": faiss_version,
        "load_average": load,
        "python": platform.python_version(),
    }


def write_results(name: str, payload: dict, output: str | None) -> Path:
    path = Path(output) if output else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def report(name: str, payload: dict, table: str, args) -> dict:
    """Print the table and write the payload (with the table) as `<name>.json` (`<name>_quick.json` for --quick)."""
    payload["table"] = table
    path = write_results(f"{name}_quick" if args.quick else name, payload, args.output)
    print(table)
    print(f"written {path}")
    return payload


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def passkey_scores(folder: str, num_examples: int | None = None, **load_kwargs) -> tuple[dict, object, object]:
    """Passkey exact match of the model in `folder` (trained by `hf-memlm train configs/passkey_cpu.yaml`),
    loaded with `AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)`, on the evaluation its
    training config names (memory condition only). Returns (scores, model, dataset)."""
    import yaml

    from hf_memlm.cli.eval import load_tokenizer
    from hf_memlm.evaluation import evaluate_retrieval, retrieval_dataset

    with open(Path(folder) / "train_config.yaml") as handle:
        evaluation = yaml.safe_load(handle)["evaluation"]
    model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs).eval()
    tokenizer = load_tokenizer(None, Path(folder), model)
    dataset = retrieval_dataset(
        "passkey",
        tokenizer,
        num_examples or evaluation["num_examples"],
        model.config.segment_length,
        evaluation["num_segments"],
        evaluation["seed"],
        evaluation.get("options"),
    )
    results = evaluate_retrieval(
        model, dataset, batch_size=evaluation.get("batch_size", 20), baselines=False, task="passkey", progress=False
    )
    scores = {"exact_match": results["overall"]["metrics"]["memory"]["exact_match"]}
    for row in results["by_distance_segments"]:
        scores[f"distance_{row['distance_segments']}"] = row["metrics"]["memory"]["exact_match"]
    return scores, model, dataset
