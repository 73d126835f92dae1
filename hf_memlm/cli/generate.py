"""`hf-memlm generate MODEL_DIR --prompt TEXT [--memory FILE] [--read FILE]`: generate text with a saved
memory LM, optionally after reading a document into its memory.

  --read FILE          read the text file into memory first (segment by segment; any length)
  --memory FILE        start from a memory saved earlier (memory.safetensors); --read adds to it
  --save-memory FILE   save the memory after reading, to answer more prompts later without re-reading

The generated text is printed to stdout; progress and notes go to stderr.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with a saved memory LM, optionally after reading a document into memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", help="folder written by `hf-memlm train` (model + tokenizer)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--read", metavar="FILE", help="text file to read into memory before generating")
    parser.add_argument("--memory", metavar="FILE", help="memory saved earlier (MemoryState safetensors file)")
    parser.add_argument("--save-memory", metavar="FILE", help="save the memory (after --read) to this file")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--read-chunk-segments",
        type=int,
        default=16,
        help="segments per forward call while reading (bounds RAM: logits of one chunk)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def run(args) -> int:
    from pathlib import Path

    if not Path(args.model_dir).is_dir():
        return _fail(f"model folder {args.model_dir!r} does not exist.")
    for flag, path in (("--read", args.read), ("--memory", args.memory)):
        if path is not None and not Path(path).is_file():
            return _fail(f"{flag} file {path!r} does not exist.")
    if args.max_new_tokens < 1:
        return _fail(f"--max-new-tokens={args.max_new_tokens} must be at least 1.")
    if args.read_chunk_segments < 1:
        return _fail(f"--read-chunk-segments={args.read_chunk_segments} must be at least 1.")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_memlm import MemLMForCausalLM, MemoryState

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir).to(device).eval()
    except (OSError, ValueError) as error:
        return _fail(f"cannot load a model and tokenizer from {args.model_dir!r}: {error}")
    uses_memory = args.read or args.memory or args.save_memory
    if not isinstance(model, MemLMForCausalLM) and uses_memory:
        return _fail(f"{args.model_dir!r} holds a {type(model).__name__}, not a memory LM; --read/--memory need one.")

    state = None
    if args.memory:
        try:
            state = MemoryState.load(args.memory, device=device)
        except (OSError, ValueError) as error:
            return _fail(f"--memory {args.memory!r}: {error}")
    if args.read:
        text = Path(args.read).read_text(encoding="utf-8")
        if not text:
            return _fail(f"--read file {args.read!r} is empty.")
        try:
            state = read_into_memory(model, tokenizer, text, state, args.read_chunk_segments)
        except ValueError as error:  # e.g. a --memory made by another model
            return _fail(str(error))
    if args.save_memory:
        if state is None:
            return _fail("--save-memory needs something in memory: pass --read FILE (and/or --memory FILE).")
        state.save(args.save_memory)
        print(f"memory saved to {args.save_memory}", file=sys.stderr)

    # a prompt that continues a remembered document carries no new beginning-of-text token
    encoded = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=state is None).to(device)
    if encoded["input_ids"].shape[1] == 0:
        return _fail("--prompt is empty after tokenization; give some text.")
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        settings.update(temperature=args.temperature, top_k=args.top_k)
    if tokenizer.pad_token_id is not None:
        settings["pad_token_id"] = tokenizer.pad_token_id
    if state is not None:
        settings["memory_state"] = state
    try:
        with torch.no_grad():
            output = model.generate(**encoded, **settings)
    except ValueError as error:
        return _fail(str(error))
    new_tokens = output[0, encoded["input_ids"].shape[1] :]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return 0


def read_into_memory(model, tokenizer, text: str, state=None, chunk_segments: int = 16):
    """Stream `text` through the model segment by segment; returns the memory state after it."""
    import torch
    from tqdm.auto import tqdm

    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)
    chunk = model.config.segment_length * chunk_segments
    with torch.no_grad():
        for start in tqdm(range(0, ids.shape[1], chunk), desc="Reading into memory", unit="chunk", file=sys.stderr):
            # logits_to_keep=1: reading needs the memory, not the logits of every token
            state = model(ids[:, start : start + chunk], memory_state=state, logits_to_keep=1).memory_state
    return state


def _fail(message: str) -> int:
    print(f"hf-memlm generate: error: {message}", file=sys.stderr, flush=True)
    return 2
