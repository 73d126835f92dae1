"""`hf-memlm generate MODEL_DIR (--prompt TEXT | --chat MESSAGE) [--read FILE] [--memory FILE]`: answer a prompt
with a saved memory LM, optionally after reading a document into its memory.

  --chat MESSAGE       ask as a user of an instruct model: the message goes through the tokenizer's chat template
                       in a fresh call after the document was read (what `configs/smollm2_passkey_cpu.yaml` trains)

  --read FILE          read the UTF-8 text file into memory first (segment by segment; any length);
                       `-` reads standard input
  --memory FILE        start from a memory saved earlier (memory.safetensors); --read adds to it
  --save-memory FILE   save the memory after reading, to answer more prompts later without re-reading
  --memory-size N      keep N entries (one per token read) instead of the saved model's memory_size

Only the generated text is printed to stdout, up to the model's end marker (its eos token, from the saved
generation_config, as `model.generate` stops): `--max-new-tokens` is a ceiling. Progress and notes (such
as how much of a long document the memory had to forget) go to stderr. Every input is checked before
the model is loaded: errors name the flag and the file.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .common import fail
from .model_folder import (
    add_memory_arguments,
    check_memory_output,
    check_text_argument,
    check_weights,
    memory_overrides,
    read_saved_config,
    read_text_file,
    resolve_device,
)

DEFAULT_MAX_NEW_TOKENS = 256  # a ceiling: a model trained with an end marker stops well before it


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="answer a prompt with a saved memory LM, optionally after reading a document into memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_dir", help="folder written by `hf-memlm train` (model + tokenizer)")
    asked = parser.add_mutually_exclusive_group(required=True)
    asked.add_argument("--prompt", help="text to continue")
    asked.add_argument(
        "--chat",
        metavar="MESSAGE",
        help="a user message, written with the tokenizer's chat template (instruct models); the assistant's reply "
        "is printed",
    )
    parser.add_argument(
        "--read", metavar="FILE", help="UTF-8 text file to read into memory before generating ('-': standard input)"
    )
    parser.add_argument("--memory", metavar="FILE", help="memory saved earlier (MemoryState safetensors file)")
    parser.add_argument("--save-memory", metavar="FILE", help="save the memory (after --read) to this file")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"at most this many new tokens; generation stops earlier at the end marker (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--read-chunk-segments",
        type=int,
        default=16,
        help="segments per step of the progress bar while reading",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    add_memory_arguments(parser)


def run(args) -> int:
    try:
        return _run(args)
    except (ValueError, OSError) as error:  # bad input, or a file that cannot be read or written
        return fail("generate", str(error))


def _run(args) -> int:
    folder = Path(args.model_dir)
    config = read_saved_config(folder)
    check_weights(folder)
    is_memory_model = config.get("model_type") == "memlm"
    if not is_memory_model and (args.read or args.memory or args.save_memory):
        raise ValueError(
            f"{args.model_dir!r} holds a {config.get('model_type')!r} model, not a memory LM; --read/--memory/"
            "--save-memory need one."
        )
    overrides = memory_overrides(args, config, folder)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be at least 1.")
    if args.read_chunk_segments < 1:
        raise ValueError(f"--read-chunk-segments={args.read_chunk_segments} must be at least 1.")
    if args.prompt is not None and not args.prompt:
        raise ValueError("--prompt is empty; give some text to continue.")
    if args.chat is not None and not args.chat.strip():
        raise ValueError("--chat is empty; give the message to ask.")
    prompt = check_text_argument(args.prompt, "--prompt") if args.prompt is not None else None
    chat = check_text_argument(args.chat, "--chat") if args.chat is not None else None
    if args.memory is not None:
        from hf_memlm.memory_state import is_memory_file

        if not Path(args.memory).is_file():
            raise ValueError(f"--memory file {args.memory!r} does not exist.")
        if not is_memory_file(args.memory):
            raise ValueError(
                f"--memory file {args.memory!r} is not a saved memory (write one with --save-memory or "
                "MemoryState.save)."
            )
    if args.save_memory:
        if not (args.read or args.memory):
            raise ValueError("--save-memory needs something in memory: pass --read FILE (and/or --memory FILE).")
        check_memory_output(args.save_memory, "--save-memory")
    device = resolve_device(args.device)
    document = read_text_file(args.read, "--read") if args.read else None

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_memlm import MemoryState

    torch.manual_seed(args.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, **overrides).to(device).eval()
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a model and tokenizer from {args.model_dir!r}: {error}") from error

    state = None
    if args.memory:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                state = MemoryState.load(args.memory, device=device, model=model)
        except (OSError, ValueError) as error:
            raise ValueError(f"--memory {args.memory!r}: {error}") from error
        for warning in caught:
            print(f"hf-memlm generate: warning: --memory {args.memory!r}: {warning.message}", file=sys.stderr)
    if document is not None:
        ids = tokenizer(document, return_tensors="pt")["input_ids"]
        before = 0 if state is None else int(state.num_entries().max())
        # a --memory made by another model is reported here (ValueError naming what differs)
        after_state = read_into_memory(model, tokenizer, ids, state, args.read_chunk_segments)
        note = overflow_note(model, args.read, ids.shape[1], before, after_state, state is None)
        if note:
            print(note, file=sys.stderr)
        state = after_state
    if args.save_memory:
        state.save(args.save_memory, model=model)
        print(f"memory saved to {args.save_memory}", file=sys.stderr)

    if chat is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"--chat needs a tokenizer with a chat template; the one in {args.model_dir!r} has none. Use --prompt."
            )
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": chat}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(device)
    else:
        # a prompt that continues a remembered document carries no new beginning-of-text token
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=state is None).to(device)
    if encoded["input_ids"].shape[1] == 0:
        raise ValueError("--prompt is empty after tokenization; give some text.")
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        settings.update(temperature=args.temperature, top_k=args.top_k)
    if tokenizer.pad_token_id is not None:
        settings["pad_token_id"] = tokenizer.pad_token_id
    if state is not None:
        settings["memory_state"] = state
    with torch.no_grad():
        output = model.generate(**encoded, **settings)
    new_tokens = output[0, encoded["input_ids"].shape[1] :].tolist()
    answer, stopped = until_end_marker(new_tokens, model.generation_config.eos_token_id)
    print(tokenizer.decode(answer, skip_special_tokens=True))
    if not stopped and len(new_tokens) >= args.max_new_tokens:
        print(
            f"(stopped at --max-new-tokens={args.max_new_tokens} before any end marker; raise it for more)",
            file=sys.stderr,
        )
    return 0


def until_end_marker(tokens: list[int], eos_token_id) -> tuple[list[int], bool]:
    """The tokens before the first end marker (`eos_token_id`: an id, a list of ids or None), and whether
    one was produced."""
    markers = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    for position, token in enumerate(tokens):
        if token in markers:
            return tokens[:position], True
    return tokens, False


def read_into_memory(model, tokenizer, text, state=None, chunk_segments: int = 16):
    """Read `text` (a string, or token ids of shape (1, tokens)) into memory with `model.memorize`, segment
    by segment; returns the memory state after it (the same as a forward over the text would)."""
    import torch
    from tqdm.auto import tqdm

    ids = tokenizer(text, return_tensors="pt")["input_ids"] if isinstance(text, str) else text
    ids = ids.to(model.device)
    chunk = model.config.segment_length * chunk_segments  # whole segments: the boundaries of one forward
    with torch.no_grad():
        for start in tqdm(range(0, ids.shape[1], chunk), desc="Reading into memory", unit="chunk", file=sys.stderr):
            state = model.memorize(ids[:, start : start + chunk], memory_state=state)
    return state


def overflow_note(model, path: str, tokens_read: int, entries_before: int, state, fresh: bool) -> str | None:
    """What a kv memory had to forget while reading `tokens_read` tokens, and how to keep it; None if nothing."""
    config = model.config
    if not config.memory_settings.entries_per_token:  # a memory of constant size forgets nothing by count
        return None
    capacity = config.memory_size
    # every token read becomes an entry, except the first of a fresh stream when a key waits for the next
    # token's value (memory_value_shift=1)
    entries_needed = entries_before + tokens_read - (config.memory_value_shift if fresh else 0)
    forgotten = entries_needed - int(state.num_entries().max())
    if forgotten <= 0:
        return None
    # the oldest entries go first: those of a --memory read earlier, then the start of this text
    from_text = max(0, forgotten - entries_before)
    what = (
        f"the first {from_text:,} tokens ({from_text / tokens_read:.0%}) of {path!r} are no longer in memory"
        if from_text
        else f"the oldest {forgotten:,} entries of the --memory state are no longer in memory"
    )
    suggested = -(-entries_needed // 1024) * 1024  # rounded up to a multiple of 1024
    return (
        f"hf-memlm generate: note: the memory keeps memory_size={capacity:,} entries (one per token) and "
        f"{entries_needed:,} were needed: {what}. To keep all of it, pass --memory-size {suggested} (in Python: "
        f"AutoModelForCausalLM.from_pretrained(folder, memory_size={suggested}))."
    )
