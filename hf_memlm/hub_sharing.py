"""What `MemLMPreTrainedModel` adds to `PreTrainedModel`'s saving and pushing.

Part of the Hub payload (copied next to the weights), so it stays small: after a save it removes stale
weight files, and it hands the model card and the Hub upload to the hf_memlm library
(`hf_memlm.integrations.hub`) where hf_memlm is installed. Loaded with `trust_remote_code=True` where it is
not, the model saves without a card and `push_to_hub` is transformers' own (with its generic card).
"""

from __future__ import annotations

import importlib
import json
import logging
import os

logger = logging.getLogger(__name__)

# save_pretrained(push_to_hub=True, ...) settings that go to the upload, not to the save
_HUB_SETTINGS = ("repo_id", "commit_message", "commit_description", "private", "token", "create_pr", "revision")


def library_hub():
    """`hf_memlm.integrations.hub` where hf_memlm is installed, else None.

    Looked up by name when called: the card and the upload are not needed to run the model, so the payload
    does not depend on the library (a copy next to the weights must load without it)."""
    try:
        return importlib.import_module("hf_memlm.integrations.hub")
    except ImportError:
        return None


class HubSharingMixin:
    """Saving writes the model card, and pushes upload it (transformers' own `push_to_hub` would replace it
    with a generic card), where hf_memlm is installed."""

    def save_pretrained(self, save_directory, is_main_process: bool = True, *, push_to_hub: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the model card `README.md` (see
        `hf_memlm.integrations.model_card`; a README.md that a person wrote is kept).

        With `push_to_hub=True` the folder is then uploaded to the Hub repo `repo_id` (default: the folder's
        name) with this card."""
        hub = library_hub()
        settings = {}
        if push_to_hub and hub is not None:
            settings = {name: kwargs.pop(name) for name in _HUB_SETTINGS if name in kwargs}
        elif push_to_hub:
            kwargs["push_to_hub"] = True  # transformers' own upload
        before = _weight_files(save_directory)
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if not self.should_save_on_this_rank(is_main_process) or not os.path.isdir(save_directory):
            return  # another rank saves; or a file path, which transformers logs and ignores
        _remove_stale_weights(save_directory, before)
        if hub is None:
            return
        hub.write_card_on_save(self, save_directory)
        if push_to_hub:
            repo_id = settings.pop("repo_id", None) or os.path.basename(os.path.abspath(save_directory))
            hub.upload_folder_to_hub(save_directory, repo_id, **settings)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the weights, `config.json`, the modeling code and the model card to the Hub repo `repo_id`
        (created when missing) in one commit; `PreTrainedModel.push_to_hub`'s arguments, plus `license` and
        `datasets` for the card (see `hf_memlm.integrations.hub.push_model`). The tokenizer is pushed apart
        (`tokenizer.push_to_hub(repo_id)`, before or after). Returns the commit info."""
        hub = library_hub()
        if hub is None:
            return super().push_to_hub(repo_id, **kwargs)
        return hub.push_model(self, repo_id, **kwargs)


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


__all__ = ["HubSharingMixin", "library_hub"]
