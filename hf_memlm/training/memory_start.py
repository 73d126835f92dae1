"""Start a new model's memory from a trained one (`model.memory_from`): training in stages.

Some memories learn best in stages: the SmolLM2 pass-key memory learns single keys with keys from one token, and
only then, started from that memory, tells named needles apart with keys from four tokens
(`memory_key_projections: per_token`). Each stage is one `hf-memlm train` config whose `model.memory_from` names
the folder the previous stage saved.

Weights match by name (`memory_blocks.8.mem_key.weight`). The saved memory must fit the new model: same kind,
same layers, same shapes, and no weight the new model has no place for (`check_memory_source` says which setting
differs). Weights the new model has and the folder has not keep their initial values; for the per-token key
projections that is zero, so the new model starts out reading exactly as the trained one did. Only the memory
blocks are read from the folder (safetensors headers first, then just those tensors), never the base's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

MEMORY_PREFIX = "memory_blocks."
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


def resolve_memory_source(source: str) -> Path:
    """The local folder of `source`: a folder as given, or a Hub model id downloaded (config and safetensors)."""
    from hf_memlm.integrations.model_card import is_hub_id

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"model.memory_from: {source!r} is a file; name the folder a trained model was saved to (what "
                "`hf-memlm train` writes at output_dir, or model.save_pretrained)."
            )
        return path
    if not is_hub_id(source):
        raise FileNotFoundError(
            f"model.memory_from: no folder {source!r} (from the working folder {Path.cwd()}); name the folder a "
            "trained model was saved to, or a Hub model id."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["config.json", "*.safetensors", _INDEX_FILE]))
    except Exception as error:  # offline, unknown repo, no access: the Hub's own words say which
        raise FileNotFoundError(
            f"model.memory_from: {source!r} is no local folder (from the working folder {Path.cwd()}) and could not "
            f"be downloaded from the Hub ({type(error).__name__}: {error})."
        ) from error


def _saved_memory_files(folder: Path) -> dict[str, Path]:
    """Memory weight name -> the safetensors file holding it, for a single-file or sharded save."""
    if (folder / _INDEX_FILE).is_file():
        weight_map = json.loads((folder / _INDEX_FILE).read_text(encoding="utf-8")).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items() if name.startswith(MEMORY_PREFIX)}
    if (folder / _SINGLE_FILE).is_file():
        with safe_open(str(folder / _SINGLE_FILE), framework="pt") as handle:
            return {name: folder / _SINGLE_FILE for name in handle.keys() if name.startswith(MEMORY_PREFIX)}
    raise ValueError(
        f"model.memory_from: {str(folder)!r} holds no safetensors weights ({_SINGLE_FILE} or {_INDEX_FILE}); name "
        "a folder written by `hf-memlm train` or model.save_pretrained (safetensors, the default)."
    )


def _read_memory(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The memory weights themselves (a few MB), each file opened once; the base's tensors are not read."""
    loaded = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), framework="pt") as handle:
            loaded.update({name: handle.get_tensor(name) for name in handle.keys() if name in files})
    return loaded


def check_memory_source(source: str, config) -> dict[str, Path]:
    """Check that the memory saved at `source` fits a model of `config` (a `MemLMConfig`), reading only the saved
    config and the weights' headers. Returns where each memory weight is. Raises ValueError naming
    the setting that differs."""
    folder = resolve_memory_source(source)
    config_path = folder / "config.json"
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model.memory_from: {str(folder)!r} has no readable config.json ({error}); name a folder written by "
            "`hf-memlm train` or model.save_pretrained."
        ) from error
    if not isinstance(saved, dict) or saved.get("model_type") != "memlm":
        found = saved.get("model_type") if isinstance(saved, dict) else None
        raise ValueError(
            f"model.memory_from: {str(folder)!r} holds a {found!r} model, not a memory model (model_type 'memlm'): "
            "name the folder of a trained hf_memlm model."
        )
    for setting in ("memory_type", "memory_layers"):
        if saved.get(setting) != getattr(config, setting):
            raise ValueError(
                f"model.memory_from: the saved memory has {setting}={saved.get(setting)!r}, this model "
                f"{getattr(config, setting)!r}. Set model.memory.{setting}: {saved.get(setting)!r} to continue "
                "training that memory."
            )
    files = _saved_memory_files(folder)
    if not files:
        raise ValueError(f"model.memory_from: {str(folder)!r} holds no memory weights ({MEMORY_PREFIX}*).")
    return files


def load_memory_from(model, source: str) -> list[str]:
    """Copy the memory weights saved at `source` into `model` (a `MemLMForCausalLM`, before freezing or LoRA).

    Returns the names of the memory weights the folder did not hold, which keep their initial values. Raises
    ValueError, changing nothing, when a saved weight has no place in `model` or another shape.
    """
    files = check_memory_source(source, model.config)
    loaded = _read_memory(files)
    # the state dict: parameters and persistent buffers, sharing storage with the model
    params = {name: tensor for name, tensor in model.state_dict().items() if name.startswith(MEMORY_PREFIX)}
    unexpected = sorted(set(files) - set(params))
    if unexpected:
        raise ValueError(
            f"model.memory_from: the saved memory holds weights this model has no place for: {unexpected}. Its "
            "settings differ (memory_key_window, memory_key_projections, ...): copy model.memory from the "
            "saved config.json, changing only what adds weights."
        )
    wrong = {
        name: (tuple(tensor.shape), tuple(params[name].shape))
        for name, tensor in loaded.items()
        if tensor.shape != params[name].shape
    }
    if wrong:
        described = "; ".join(f"{name}: saved {saved}, here {here}" for name, (saved, here) in sorted(wrong.items()))
        raise ValueError(
            f"model.memory_from: saved memory weights have other shapes ({described}). The base's width or "
            "memory_heads / memory_head_dim differ: use the saved model's settings."
        )
    with torch.no_grad():
        for name, tensor in loaded.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return sorted(set(params) - set(files))


__all__ = ["check_memory_source", "load_memory_from", "resolve_memory_source"]
