"""The long-context suite as lm-evaluation-harness tasks: the functions the task YAMLs in
`hf_memlm/resources/lm_eval_tasks/` name (`memlm_ruler_*`, `memlm_babilong_*`, groups `memlm_ruler` and
`memlm_babilong`).

The examples are generated when lm-eval loads a task (`custom_dataset`), with `hf_memlm.data.long_context`,
from `--metadata` (JSON): `lengths` (e.g. ["4k", "16k"]), `num_examples` (per length), `seed`,
`filler_text` (a text file for the book filler; default the bundled excerpt) and `tokenizer` (default: the
model's `pretrained` folder, which lm-eval passes too). The same arguments give the examples
`hf-memlm eval --suite` scores.

A context is the document, `DOCUMENT_END`, then the prompt (already in the model's chat template: do not pass
`--apply_chat_template`). `--model hf-memlm` reads the document into memory and asks the prompt in a fresh call,
as the suite does, so the two score alike; other model types read the whole context as text.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hf_memlm.data.long_context import (
    DEFAULT_EXAMPLES,
    DEFAULT_LENGTHS,
    make_long_context_dataset,
    score_reply,
)

# Where the document ends and the question begins (`--model hf-memlm` splits the context there).
DOCUMENT_END = "\n<|memlm: end of document|>\n"


def tasks_dir() -> Path:
    """The folder of the task YAMLs, for `--include_path` (the command line adds it by itself)."""
    return Path(str(resources.files("hf_memlm").joinpath("resources", "lm_eval_tasks")))


def load_examples(
    long_context_task: str,
    tokenizer=None,
    pretrained=None,
    lengths=DEFAULT_LENGTHS,
    num_examples: int = DEFAULT_EXAMPLES,
    seed: int = 0,
    filler_text: str | None = None,
    **_ignored,  # the rest of lm-eval's metadata (the model's arguments, the task's version)
) -> dict:
    """lm-eval's `custom_dataset`: {"test": the examples of one task}."""
    from transformers import AutoTokenizer

    source = tokenizer or pretrained
    if not isinstance(source, (str, Path)) or not str(source):
        raise ValueError(
            "the memlm long-context tasks generate their examples with the model's tokenizer: pass a folder or Hub "
            'id as --model_args pretrained=... or in --metadata \'{"tokenizer": "..."}\'.'
        )
    text = None
    if filler_text is not None:
        path = Path(filler_text)
        if not path.is_file():
            raise ValueError(f"filler_text={filler_text!r} is not a file; give a UTF-8 text file for the book filler.")
        text = path.read_text(encoding="utf-8")
    data = make_long_context_dataset(
        long_context_task,
        AutoTokenizer.from_pretrained(str(source)),
        lengths,
        int(num_examples),
        seed=int(seed),
        text=text,
    )
    return {"test": data}


def doc_to_text(doc: dict) -> str:
    return doc["document"] + DOCUMENT_END + doc["prompt"]


def process_results(doc: dict, results: list[str]) -> dict:
    """The suite's score of the reply (0-100)."""
    return {"score": 100 * score_reply(results[0], doc["answers"], doc["scoring"], doc["choices"])}


__all__ = ["DOCUMENT_END", "doc_to_text", "load_examples", "process_results", "tasks_dir"]
