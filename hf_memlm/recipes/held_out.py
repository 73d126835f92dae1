"""The held-out text of a train config's `evaluation.source`, read by the evaluation after training
(`final_eval.py`: filler of the retrieval tasks) and by the perplexity comparison (`comparison.py`)."""

from __future__ import annotations


def held_out_corpus(source):
    """The documents of `evaluation.source` (as `data.source` takes them), with errors that name the setting."""
    from hf_memlm.data import load_text_corpus

    try:
        return load_text_corpus(source)
    except (FileNotFoundError, ValueError) as error:
        raise type(error)(f"evaluation.source: {error}") from error


def filler_text(source) -> str:
    """The documents of `evaluation.source` joined into one filler text."""
    return "\n\n".join(held_out_corpus(source)["text"])


__all__ = ["filler_text", "held_out_corpus"]
