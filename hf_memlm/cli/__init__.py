"""`hf-memlm` command line: one sub-command per module, each with `add_parser(subparsers)` and `run(args)`.

Sub-command modules import heavy libraries inside `run`, so `hf-memlm --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module; each module defines add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "demo": "hf_memlm.cli.demo",
    "train": "hf_memlm.cli.train",
    "generate": "hf_memlm.cli.generate",
    "eval": "hf_memlm.cli.eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-memlm", description="External memory for 🤗 Transformers causal LMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from hf_memlm.training.cpu_allocator import keep_freed_memory

    keep_freed_memory()  # training and long reads reuse freed memory instead of page-faulting it in again
    module = importlib.import_module(COMMANDS[args.command])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
