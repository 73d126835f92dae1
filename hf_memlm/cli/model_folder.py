"""What `hf-memlm generate` and `hf-memlm eval` check before any work: a saved model folder with its weights,
memory settings that may change at load time, and output paths that would not destroy anything.

Every check raises `ValueError` with a message that names the flag or path and says how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path

# What `save_pretrained` writes (single file or sharded, safetensors or pickle).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_saved_config(folder: Path) -> dict:
    """`config.json` of a saved model folder (see `check_weights` for the weights)."""
    if not folder.exists():
        raise ValueError(
            f"model folder {str(folder)!r} does not exist; pass a folder written by model.save_pretrained()."
        )
    if not folder.is_dir():
        raise ValueError(
            f"{str(folder)!r} is a file, not a model folder; pass the folder written by model.save_pretrained()."
        )
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"{str(folder)!r} has no config.json, so it holds no saved model; pass a folder written by "
            "model.save_pretrained()."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not a valid JSON config: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a valid JSON config: it holds a {type(config).__name__}.")
    return config


def check_weights(folder: Path) -> None:
    """The folder holds saved weights: without them `from_pretrained` would initialise a model at random."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"{str(folder)!r} has a config.json but no weights ({' or '.join(WEIGHT_FILES[:3])}): loading it would "
            "give a randomly initialised model. Pass the folder where the model was saved (model.save_pretrained "
            "or `hf-memlm train` writes model.safetensors there)."
        )


def add_memory_arguments(parser) -> None:
    """`--memory-size` and `--memory-topk`: kv memory settings that are safe to change when loading."""
    group = parser.add_argument_group(
        "memory settings (kv memory; changed at load time, the weights stay the same)",
        "In Python: AutoModelForCausalLM.from_pretrained(folder, memory_size=..., memory_topk=...).",
    )
    group.add_argument(
        "--memory-size",
        type=int,
        default=None,
        metavar="N",
        help="entries kept per sequence, one per token read; older ones are forgotten (default: as saved)",
    )
    group.add_argument(
        "--memory-topk",
        type=_topk_value,
        default=None,
        metavar="K",
        help="read only the K best-matching entries per head, or 'none' for all of them (default: as saved)",
    )


def _topk_value(text: str):
    if text.lower() in ("none", "all", "null"):
        return "none"
    try:
        return int(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}") from None


def memory_overrides(args, config: dict, folder: Path) -> dict:
    """The `from_pretrained` keyword arguments for the memory flags given, checked against the saved config."""
    overrides = {}
    if args.memory_size is not None:
        overrides["memory_size"] = args.memory_size
    if args.memory_topk is not None:
        overrides["memory_topk"] = None if args.memory_topk == "none" else args.memory_topk
    if not overrides:
        return overrides
    flags = " and ".join(f"--{name.replace('_', '-')}" for name in overrides)
    if config.get("model_type") != "memlm":
        raise ValueError(
            f"{flags} (memory settings) cannot be used here: {str(folder)!r} holds a "
            f"{config.get('model_type')!r} model, not a memory LM."
        )
    from hf_memlm.memory_kinds import MEMORY_KINDS

    kind = MEMORY_KINDS.get(config.get("memory_type"))
    if kind is None or any(name not in kind.settings.load_time for name in overrides):
        owners = sorted(
            {k for k, other in MEMORY_KINDS.items() for name in overrides if name in other.settings.load_time}
        )
        changeable = ", ".join(kind.settings.load_time) if kind is not None else ""
        raise ValueError(
            f"{flags} ({' and '.join(owners)} memory settings) cannot be used here: {str(folder)!r} holds "
            f"{config.get('memory_type')!r} memory, whose settings that may change at load time are: "
            f"{changeable or 'none (its size is part of its weights)'}."
        )
    size = overrides.get("memory_size", config.get("memory_size"))
    topk = overrides.get("memory_topk", config.get("memory_topk"))
    if "memory_size" in overrides and size < 1:
        raise ValueError(f"--memory-size={size} must be at least 1.")
    if "memory_topk" in overrides and topk is not None and topk < 1:
        raise ValueError(f"--memory-topk={topk} must be at least 1 (or 'none' to read every entry).")
    if topk is not None and size is not None and topk > size:
        raise ValueError(
            f"memory_topk={topk} is larger than memory_size={size}: top-k cannot read more entries than the memory "
            "holds. Lower --memory-topk or raise --memory-size."
        )
    return overrides


def check_memory_output(path: str, flag: str) -> None:
    """A path where a `MemoryState` may be written: not a folder, its folder exists, and an existing file there
    is a saved memory (replaced), never anything else (model weights, a document, ...)."""
    from hf_memlm.memory_state import check_save_target

    try:
        check_save_target(path)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{flag}: {error}") from None


def check_output_dir(path: str, flag: str) -> Path:
    """A folder for reports: it may exist (files are added to it) but must not be a file."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {path!r} is an existing file, not a folder; choose a folder for the reports.")
    for parent in folder.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag} {path!r}: {str(parent)!r} is a file, so no folder can be made under it.")
    place = folder
    while not place.exists() and place != place.parent:
        place = place.parent
    import os
    import tempfile

    try:  # a read-only place fails here, not after the whole evaluation
        handle, probe = tempfile.mkstemp(prefix=".hf_memlm_write_check_", dir=place)
    except OSError as error:
        raise ValueError(
            f"{flag} {path!r} cannot be written: {str(place)!r} does not accept new files ({error.strerror}); "
            "choose a folder you can write to."
        ) from None
    os.close(handle)
    os.unlink(probe)
    return folder


def read_text_file(path: str, flag: str) -> str:
    """The UTF-8 text of `path` (`-`: standard input; a pipe or device such as /dev/stdin is read as it
    is), or a ValueError naming it (missing, a folder, not UTF-8, empty)."""
    if path == "-":
        import sys

        data, path = sys.stdin.buffer.read(), "<standard input>"
    else:
        file = Path(path)
        if not file.exists():
            raise ValueError(f"{flag} file {path!r} does not exist.")
        if file.is_dir():
            raise ValueError(f"{flag} {path!r} is a folder; pass a text file (or '-' for standard input).")
        data = file.read_bytes()
    text = decode_utf8(data, f"{flag} file {path!r}")
    if not text:
        raise ValueError(f"{flag} file {path!r} is empty.")
    return text


def decode_utf8(data: bytes, what: str) -> str:
    """`data` as UTF-8 text, or a ValueError naming `what`, the first bad byte and its offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{what} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`."
        ) from None


def check_text_argument(text: str, flag: str) -> str:
    """A command-line argument that must be UTF-8 text (bytes that are not arrive as lone surrogates)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as error:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise ValueError(f"{flag} is not valid text (a lone surrogate at character {error.start}).") from None
    return decode_utf8(raw, flag)


def resolve_device(name: str | None, flag: str = "--device") -> str:
    """`name` (None or 'auto': cuda when available, else cpu), checked to exist on this machine."""
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {name!r} is not a device; use cpu, cuda, cuda:1, mps, ...") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{flag} {name}: CUDA is not available on this machine (no GPU, or torch built without CUDA); "
                f"use {flag} cpu."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: MPS is not available on this machine; use {flag} cpu.")
    return name
