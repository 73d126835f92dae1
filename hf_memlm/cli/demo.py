"""`hf-memlm demo`: build a small memory LM from the embedded default config, stream a long text
through it segment by segment, save it, reload it with `AutoModelForCausalLM` and check it matches."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fail

# Written into the demo's folder: a later demo may replace a folder holding it, and no other.
DEMO_MARKER = "hf_memlm_demo.txt"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="build, run, save and reload a tiny memory LM (no download, no GPU)",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--memory-type", choices=["kv", "slot"], default="kv")
    parser.add_argument("--segment-length", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096, help="length of the text streamed through the model")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--seed", type=int, default=0)


def check_demo_folder(path: str) -> Path:
    """The demo's output folder: new, empty, or written by an earlier demo (it holds `DEMO_MARKER`). A folder
    holding anything else (a trained model above all) is never written into."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output-dir {path!r} is an existing file; choose a folder for the demo model.")
    if folder.is_dir():
        names = sorted(item.name for item in folder.iterdir())
        if names and DEMO_MARKER not in names:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise ValueError(
                f"--output-dir {path!r} already holds files that hf-memlm demo did not write ({shown}); the demo "
                "would overwrite them (a model there would be replaced). Choose a new or empty folder."
            )
    return folder


def run(args) -> int:
    try:
        output_dir = check_demo_folder(args.output_dir)
    except ValueError as error:
        return fail("demo", str(error))
    try:
        return _run(args, output_dir)
    except (ValueError, OSError) as error:  # bad settings, or a folder that cannot be written
        return fail("demo", str(error))


def _run(args, output_dir: Path) -> int:
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from hf_memlm import MemLMConfig, MemLMForCausalLM
    from hf_memlm.data import default_text
    from hf_memlm.memory_kinds import MEMORY_KINDS
    from hf_memlm.recipes.defaults import tiny_llama_config

    torch.manual_seed(args.seed)
    small = {"memory_size": 2048, "memory_topk": 32, "num_slots": 64}  # each kind takes its own
    config = MemLMConfig(
        text_config=tiny_llama_config(),
        memory_type=args.memory_type,
        memory_layers=[1],
        segment_length=args.segment_length,
        **{name: value for name, value in small.items() if name in MEMORY_KINDS[args.memory_type].settings.names()},
    )
    model = MemLMForCausalLM(config).eval()
    # An untrained memory is a no-op (zero output projections, as LoRA starts); give the projections random
    # values so that memory visibly changes the outputs and the checks below compare something.
    with torch.no_grad():
        for block in model.memory_blocks.values():
            block.output_projection.weight.normal_(std=0.05)
    n_params = sum(p.numel() for p in model.parameters())
    n_memory = sum(p.numel() for p in model.memory_blocks.parameters())
    print(
        f"model: {config.text_config.model_type} base, {config.text_config.num_hidden_layers} layers, "
        f"hidden {config.text_config.hidden_size}; {config.memory_type} memory beside layer(s) {config.memory_layers}; "
        f"{n_params:,} parameters ({n_memory:,} in memory blocks)"
    )

    data = default_text().encode("utf-8")[: args.tokens]
    input_ids = torch.tensor([list(data)], dtype=torch.long)
    length = input_ids.shape[1]
    segments = -(-length // config.segment_length)
    print(f"input: {length} byte tokens of the embedded text -> {segments} segments of {config.segment_length}")

    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids, labels=input_ids)
        elapsed = time.perf_counter() - start
        # same stream, fed in two calls with the memory state handed over
        half = (segments // 2) * config.segment_length
        first = model(input_ids[:, :half])
        second = model(input_ids[:, half:], memory_state=first.memory_state)
    streamed = torch.cat([first.logits, second.logits], dim=1)
    with torch.no_grad(), model.disable_memory():
        without = model(input_ids).logits
    print(f"forward: loss {out.loss.item():.3f} (untrained, ln 260 = 5.56) in {elapsed:.2f} s")
    first_segment = config.segment_length
    print(
        "memory's effect on the logits: segment 0 (initial memory) "
        f"{(out.logits[:, :first_segment] - without[:, :first_segment]).abs().max().item():.2e}, "
        f"later segments {(out.logits[:, first_segment:] - without[:, first_segment:]).abs().max().item():.2e}"
    )
    print(f"memory state after the stream: {out.memory_state}")
    if config.memory_settings.entries_per_token:
        print(f"  entries per row: {out.memory_state.num_entries().tolist()} (capacity {config.memory_size}, FIFO)")
    print(
        f"streaming in two calls vs one call: max |logit difference| = {(streamed - out.logits).abs().max().item():.2e}"
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / DEMO_MARKER).write_text(
        "Written by `hf-memlm demo`: running the demo again with this --output-dir replaces this folder's files.\n"
    )
    model.save_pretrained(output_dir)
    out.memory_state.save(output_dir / "memory.safetensors")
    print(f"saved: {output_dir}/ ({', '.join(sorted(p.name for p in output_dir.iterdir()))})")

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    with torch.no_grad():
        again = reloaded(input_ids).logits
    diff = (again - out.logits).abs().max().item()
    print(f"reloaded with AutoModelForCausalLM as {type(reloaded).__name__}: max |logit difference| = {diff:.2e}")
    ok = diff < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1
