"""The model card (`README.md`) that `save_pretrained` writes next to the weights.

The card is rendered from the template `resources/MODEL_CARD.md` of the installed package. This file is
also part of the Hub payload (copied next to the weights, since `modeling_memlm.py` imports it); in that
copy there is no package around it, so it renders a shorter built-in card instead.

A README.md that hf_memlm did not write (it lacks `CARD_MARKER`) is never replaced: users expect a card
they wrote or edited to survive saving the model again. A card hf_memlm wrote is regenerated on save.
Imports only the standard library (payload rules: torch, transformers and flat siblings at most).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

from .memory_kinds import MEMORY_KINDS

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CARD_MARKER = (
    "<!-- hf_memlm model card: generated from the model's config and regenerated when the model is saved "
    "again. Delete this line to keep your edits. -->"
)
TEMPLATE_FILE = Path(__file__).resolve().parent / "resources" / "MODEL_CARD.md"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# `owner/name` or a legacy top-level name such as `gpt2`
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

# Used where the template file is absent (the copy of this file next to the weights, for remote code).
_BUILT_IN_TEMPLATE = """---
{{ metadata }}
---

{{ marker }}

# {{ model_name }}

A memory-augmented causal LM made with [hf_memlm](https://pypi.org/project/hf-memlm/): {{ base_description }},
with `{{ memory_type }}` memory beside decoder layer(s) {{ memory_layers }}, processing text in segments of
{{ segment_length }} tokens.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ model_id }}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{{ model_id }}", trust_remote_code=True)
```

| setting | value |
| --- | --- |
{{ memory_rows }}

## Training

{{ training_section }}

## Evaluation

{{ evaluation_section }}
"""


def hub_base_model(config) -> str | None:
    """The Hub id the base model was loaded from (`from_base("owner/name")`), or None when the base was built
    from a config or loaded from a local folder.

    `from_pretrained` records what it was given in the base config's `_name_or_path`, which `config.json`
    keeps; a name that is an existing folder, or not shaped like a Hub id, is a local path."""
    name = getattr(config.text_config, "_name_or_path", None) or ""
    if not name or os.path.isdir(name) or not _HUB_ID.match(name) or ".." in name:
        return None
    return name


def is_generated_card(text: str) -> bool:
    """Whether a README.md was written by hf_memlm (and may be regenerated)."""
    return CARD_MARKER.split(":")[0] in text


def render_model_card(
    config,
    *,
    model_id: str | None = None,
    model_name: str | None = None,
    training: dict | None = None,
    evaluation: str | None = None,
    evaluation_command: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    num_parameters: dict[str, int] | None = None,
) -> str:
    """The model card of a memory LM with `config` (a `MemLMConfig`), as Markdown with Hub YAML metadata.

    Args:
        model_id: the Hub id (or folder) the usage snippet loads; default `model_name`.
        model_name: the card's title; default the last part of `model_id`, else "hf_memlm model".
        training: facts about training, shown as a table in the order given (e.g. `{"data": "passkey",
            "steps": 300}`); None: "not recorded".
        evaluation: a Markdown table of results; None: "not evaluated".
        evaluation_command: the command that produced `evaluation` (shown under it).
        license: an SPDX-style Hub license id (`apache-2.0`, ...); left out of the metadata when None.
        datasets: Hub dataset ids the model was trained on (Hub metadata).
        tags: extra Hub tags.
        num_parameters: `{"total": ..., "memory": ...}` parameter counts.
    """
    if model_name is None:
        model_name = model_id.rstrip("/").split("/")[-1] if model_id else "hf_memlm model"
    model_id = model_id or model_name
    text = config.text_config
    base_id = hub_base_model(config)
    if base_id:
        base_description = f"the [`{base_id}`](https://huggingface.co/{base_id}) base model (`{text.model_type}`)"
    elif getattr(text, "_name_or_path", None):
        base_description = f"a pretrained `{text.model_type}` base model loaded from a local folder"
    else:
        base_description = f"a `{text.model_type}` base model built from its config"

    all_tags = ["hf_memlm", "memory-augmented", "long-context", f"{config.memory_type}-memory", "custom_code"]
    all_tags += [tag for tag in tags or [] if tag not in all_tags]
    metadata = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": all_tags}
    if base_id:
        metadata["base_model"] = base_id
    if license:
        metadata["license"] = license
    if datasets:
        metadata["datasets"] = list(datasets)

    values = {
        "metadata": _yaml(metadata),
        "marker": CARD_MARKER,
        "model_name": model_name,
        "model_id": model_id,
        "base_description": base_description,
        "memory_type": config.memory_type,
        "memory_layers": ", ".join(str(i) for i in config.memory_layers),
        "segment_length": str(config.segment_length),
        "memory_rows": "\n".join(f"| {name} | {value} |" for name, value in _memory_rows(config, num_parameters)),
        "training_section": _table(training, ("", "value")) if training else "Not recorded with this model.",
        "evaluation_section": _evaluation(evaluation, evaluation_command),
    }
    return _fill(_template(), values)


def write_model_card(folder: str | os.PathLike, config, *, overwrite: bool = False, **card) -> Path | None:
    """Write `folder/README.md` (see `render_model_card` for `card`; `model_id` defaults to the folder's
    name); returns its path, or None when a README.md that hf_memlm did not write is there and `overwrite`
    is False (it is kept as is)."""
    path = Path(folder) / CARD_FILE
    card.setdefault("model_id", Path(folder).resolve().name)
    if path.is_file() and not overwrite:
        existing = path.read_text(encoding="utf-8", errors="replace")
        if not is_generated_card(existing):
            logger.warning(
                "%s was not written by hf_memlm; keeping it (the generated model card is not written). Delete it, "
                "or pass overwrite=True, to get the generated card.",
                path,
            )
            return None
    path.write_text(render_model_card(config, **card), encoding="utf-8")
    return path


def remote_card_is_foreign(api, repo_id: str, token=None, revision: str | None = None) -> bool:
    """Whether the Hub repo `repo_id` already has a README.md that hf_memlm did not write (so a push must
    not replace it). `api` is a `huggingface_hub.HfApi`."""
    if not api.file_exists(repo_id, CARD_FILE, revision=revision, token=token):
        return False
    local = api.hf_hub_download(repo_id, CARD_FILE, revision=revision, token=token)
    return not is_generated_card(Path(local).read_text(encoding="utf-8", errors="replace"))


def upload_folder_to_hub(
    folder,
    repo_id: str,
    *,
    config=None,
    card: dict | None = None,
    ignore_patterns: list[str] | None = None,
    private=None,
    token=None,
    revision=None,
    **commit,
):
    """Create the Hub repo `repo_id` if needed and upload `folder` to it in one commit; returns the `CommitInfo`.

    With `config`, the folder's card is first (re)written for the repo's full id (`render_model_card`
    arguments in `card`), unless the folder holds a README.md hf_memlm did not write. Files matching
    `ignore_patterns` (and hidden or `*.partial` files) are not uploaded. A README.md already
    in the repo that hf_memlm did not write is kept (the folder's is left out of the upload).
    `commit`: `commit_message`, `commit_description`, `create_pr`."""
    from transformers.utils.hub import hf_api

    api = hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if config is not None:
        write_model_card(folder, config, model_id=repo_id, **(card or {}))
    ignore = ["*.partial", ".*", *(ignore_patterns or [])]
    if remote_card_is_foreign(api, repo_id, token=token, revision=revision):
        logger.warning("%s already has a README.md that hf_memlm did not write; keeping it.", repo_id)
        ignore.append(CARD_FILE)
    commit = {name: value for name, value in commit.items() if value is not None}
    commit.setdefault("commit_message", "Upload hf_memlm model")
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), token=token, revision=revision, ignore_patterns=ignore, **commit
    )


def parameter_counts(model) -> dict[str, int]:
    """`{"total": ..., "memory": ...}`: parameters of `model` (tied ones once) and those in memory blocks."""
    unique = {id(p): p for p in model.parameters()}
    memory = {id(p) for p in model.memory_blocks.parameters()}
    return {
        "total": sum(p.numel() for p in unique.values()),
        "memory": sum(p.numel() for key, p in unique.items() if key in memory),
    }


def _template() -> str:
    if __package__ == "hf_memlm" and TEMPLATE_FILE.is_file():
        return TEMPLATE_FILE.read_text(encoding="utf-8")
    if __package__ == "hf_memlm":
        logger.warning("model card template %s is missing; writing the built-in card", TEMPLATE_FILE)
    return _BUILT_IN_TEMPLATE


def _fill(template: str, values: dict[str, str]) -> str:
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if unknown:
        raise ValueError(f"model card template names unknown fields {unknown}; known fields are {sorted(values)}.")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _yaml(metadata: dict) -> str:
    # JSON strings are valid YAML scalars, and quoting keeps ids such as `1e3` or `no` strings
    lines = []
    for key, value in metadata.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def _memory_rows(config, num_parameters) -> list[tuple[str, str]]:
    text = config.text_config
    rows = [
        ("base model type", f"`{text.model_type}`"),
        ("memory kind", f"`{config.memory_type}`"),
        ("memory layers", ", ".join(str(i) for i in config.memory_layers)),
        ("segment length (tokens)", str(config.segment_length)),
        ("memory heads x head width", f"{config.memory_heads} x {config.memory_head_dim}"),
    ]
    rows += MEMORY_KINDS[config.memory_type].describe_settings(config)
    if config.memory_dtype:
        rows.append(("memory dtype", config.memory_dtype))
    if num_parameters:
        total, memory = num_parameters.get("total"), num_parameters.get("memory")
        if total is not None:
            rows.append(
                ("parameters", f"{total:,}" + (f" ({memory:,} in memory blocks)" if memory is not None else ""))
            )
    return rows


def _table(facts: dict, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in facts.items()]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _evaluation(table: str | None, command: str | None) -> str:
    if not table:
        return "Not evaluated with this model."
    return table.strip() + (f"\n\nProduced by: `{command}`" if command else "")


# Weight files `from_pretrained` looks for, besides the shards their index files name. transformers removes
# stale shards of the names it writes, but not these: a stale one left by another model would be loaded
# instead of (or beside) what was just saved, or keeps pickled weights around.
_WEIGHT_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _weight_files(folder) -> dict[str, tuple]:
    """Weight files in `folder` (the fixed names and the shards their indexes list) -> (inode, mtime, size)."""
    if not os.path.isdir(folder):
        return {}
    names = set(_WEIGHT_NAMES)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        try:
            with open(os.path.join(folder, index), encoding="utf-8") as handle:
                names.update(str(name) for name in json.load(handle).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            pass
    found = {}
    for name in names:
        path = os.path.join(folder, name)
        if os.path.basename(name) == name and os.path.isfile(path):
            info = os.stat(path)
            found[name] = (info.st_ino, info.st_mtime_ns, info.st_size)
    return found


def _remove_stale_weights(folder, before: dict[str, tuple]) -> None:
    """Remove the weight files that were there before a save and were not rewritten by it."""
    after = _weight_files(folder)
    for name, signature in before.items():
        if after.get(name) == signature:
            logger.warning(
                "save_pretrained: removing %s, a weight file of an earlier save that would shadow this one", name
            )
            os.remove(os.path.join(folder, name))


class HubSharingMixin:
    """What `MemLMPreTrainedModel` adds to `PreTrainedModel`'s saving: the model card, and pushes that upload
    it (transformers' own `push_to_hub` would replace it with a generic card)."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, *, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a model card: `README.md` rendered from the config (see
        `model_card.py`). A README.md in the folder that hf_memlm did not write is kept as it is.

        With `push_to_hub=True` the folder is then uploaded to the Hub repo `repo_id` (default: the folder's
        name) with this card, not transformers' generic one."""
        hub_settings = {}
        if push_to_hub:
            hub_settings = {
                name: kwargs.pop(name)
                for name in ("repo_id", "commit_message", "commit_description", "private", "token", "create_pr")
                if name in kwargs
            }
        before = _weight_files(save_directory)
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if not self.should_save_on_this_rank(is_main_process) or not os.path.isdir(save_directory):
            return  # another rank saves; or a file path, which transformers logs and ignores
        _remove_stale_weights(save_directory, before)
        write_model_card(save_directory, self.config, num_parameters=parameter_counts(self))
        if push_to_hub:
            repo_id = hub_settings.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            card = {"num_parameters": parameter_counts(self)}
            upload_folder_to_hub(save_directory, repo_id, config=self.config, card=card, **hub_settings)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
        license: str | None = None,
    ):
        """Upload the weights, `config.json`, the modeling code and the model card to the Hub repo `repo_id`
        (created when missing). The tokenizer is pushed apart (`tokenizer.push_to_hub(repo_id)`), as for
        any transformers model; `hf_memlm.integrations.hub.push_trained_model` pushes a whole trained folder.

        A README.md already in the repo that hf_memlm did not write is kept. Returns the commit info."""
        card = {"tags": tags, "license": license, "num_parameters": parameter_counts(self)}
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            return upload_folder_to_hub(
                folder,
                repo_id,
                config=self.config,
                card=card,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
            )


__all__ = [
    "CARD_FILE",
    "CARD_MARKER",
    "HubSharingMixin",
    "hub_base_model",
    "is_generated_card",
    "parameter_counts",
    "remote_card_is_foreign",
    "render_model_card",
    "upload_folder_to_hub",
    "write_model_card",
]
