"""How fast a real model reads, by memory layer: `memorize` tokens/s of SmolLM2-135M-Instruct with the memory of the
real-model pass-key config beside each of `--layers`, the models timed side by side on the same chunk of book text.

`memorize` runs the decoder layers up to the memory layer and no further (`memory_writes.py`), so reading costs
about (layer + 1) decoder layers per token, plus the memory's own key and value projections. Where the memory sits
is the largest lever on reading speed; what it costs in answers is measured by training there (the pass-key
config's comments and `docs/results/smollm2_passkey.md`).

    python benchmarks/bench_memory_layer.py                      # layers 1 2 3 4 8, 16,384 tokens, 5 runs each
    python benchmarks/bench_memory_layer.py --layers 2 8 --head-dims 64 144   # also by width of the memory heads
    python benchmarks/bench_memory_layer.py --quick              # a tiny Llama, seconds (CI smoke)

The memory weights are as built: time does not depend on their values.
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_real_model import PASSKEY_MEMORY, book_tokens
from common import base_config, environment, interleaved, markdown_table, median, report

from hf_memlm import MemLMForCausalLM


def base_and_tokenizer(quick: bool, dtype: torch.dtype):
    """The base model to wrap (the shipped SmolLM2, or with `quick` a tiny Llama) and its tokenizer (None: bytes)."""
    from transformers import AutoModelForCausalLM

    if quick:
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(base_config(64, 4, 32)).to(dtype), None
    from hf_memlm.integrations.gguf import load_base_tokenizer, resolve_base

    folder, base_kwargs = resolve_base("smollm2-135m-instruct", {"dtype": "float32"})
    base_kwargs = {k: getattr(torch, v) if k == "dtype" else v for k, v in base_kwargs.items()}
    base = AutoModelForCausalLM.from_pretrained(folder, **base_kwargs).to(dtype)
    return base, load_base_tokenizer(folder, base_kwargs)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama (4 layers), 1,024 tokens (smoke test)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="memory layers (default 1 2 3 4 8)")
    parser.add_argument(
        "--head-dims", type=int, nargs="+", default=None, help="memory_head_dim values (default: the config's)"
    )
    parser.add_argument("--tokens", type=int, default=None, help="tokens per memorize call (default 16,384)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 5; quick 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model and memory")
    parser.add_argument("--text", default="data/books/held_out/moby_dick.txt", help="the book read into memory")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/memory_layer[_quick].json)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = args.layers or ([0, 1, 3] if args.quick else [1, 2, 3, 4, 8])
    count = args.tokens or (1024 if args.quick else 16384)
    repeats = args.repeats or (2 if args.quick else 5)
    base, tokenizer = base_and_tokenizer(args.quick, getattr(torch, args.dtype))
    depth = base.config.num_hidden_layers
    if count <= 0 or any(not 0 <= layer < depth for layer in layers):
        raise ValueError(f"--tokens must be positive and --layers within 0..{depth - 1}, got {count} and {layers}.")
    settings = dict(PASSKEY_MEMORY)
    if args.quick:
        settings.update(segment_length=32, memory_heads=2, memory_head_dim=16)
    head_dims = args.head_dims or [settings["memory_head_dim"]]
    ids = book_tokens(tokenizer, count, args.text)

    def wrapped(layer, head_dim):
        memory = dict(settings, memory_layers=[layer], memory_head_dim=head_dim)
        return MemLMForCausalLM.from_base(copy.deepcopy(base), memory_size=count + 1024, **memory).eval()

    shapes = [(layer, width) for layer in layers for width in head_dims]
    models = {f"{layer} x {width}": wrapped(layer, width) for layer, width in shapes}

    def reader(model):
        def run():
            with torch.no_grad():
                model.memorize(ids)

        return run

    wall, cpu = interleaved({name: reader(model) for name, model in models.items()}, repeats)
    speed = {name: count / median(times) for name, times in wall.items()}
    slowest = min(speed, key=speed.get)
    rows = [
        [
            layer,
            f"{settings['memory_heads']} x {width}",
            layer + 1,
            f"{speed[name]:,.0f}",
            f"{speed[name] / speed[slowest]:.2f}",
        ]
        for name, (layer, width) in zip(models, shapes, strict=True)
    ]
    header = ["memory layer", "memory heads x width", "decoder layers a read runs", "`memorize` tokens/s"]
    table = markdown_table([*header, f"x the slowest ({slowest})"], rows)
    payload = {
        "setting": {
            "model": "tiny llama" if args.quick else "smollm2-135m-instruct (shipped GGUF)",
            "memory": {k: v for k, v in settings.items() if k not in ("memory_layers", "memory_head_dim")},
            "dtype": args.dtype,
            "tokens": count,
            "repeats": repeats,
            "text": args.text,
        },
        "environment": environment(),
        "figures": {"memorize_tokens_per_s": speed, "wall_s": wall, "cpu_s": cpu},
    }
    return report("memory_layer", payload, table, args)


if __name__ == "__main__":
    main()
