"""The text shipped inside the package: the default corpus and the natural filler of the synthetic tasks."""

from __future__ import annotations

from importlib import resources

DEFAULT_TEXT = "pride_and_prejudice_ch1-6.txt"


def default_text() -> str:
    """The bundled public-domain excerpt (chapters 1-6 of Pride and Prejudice): the default corpus and filler."""
    return resources.files("hf_memlm").joinpath("resources", DEFAULT_TEXT).read_text(encoding="utf-8")
