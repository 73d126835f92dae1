"""Share a trained memory LM on the Hugging Face Hub: its model card, the final upload, and pushes during
training that carry the modeling code.

What `hf-memlm train` does with these (see each function):

    # after the final save (and the evaluation, when configured)
    write_model_card(output_dir, training={"data": ..., "steps": ...}, evaluation=report, model_id=hub_model_id)
    if training_args.push_to_hub:
        push_trained_model(output_dir, hub_model_id, token=training_args.hub_token, ...)

    # while training with `push_to_hub: true` (Trainer's `hub_strategy`)
    trainer = MemLMTrainer(..., callbacks=[HubCodeCallback()])
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from transformers import TrainerCallback

from hf_memlm import model_card

logger = logging.getLogger(__name__)

# Never uploaded from a training folder: Trainer's own exclusions (checkpoints, `_*`), hidden and partial files.
IGNORED_FOR_UPLOAD = ["checkpoint-*", "checkpoint-*/**", "_*", ".*", "*.partial"]


def write_model_card(
    folder: str | Path,
    *,
    training: dict | None = None,
    evaluation: dict | str | None = None,
    evaluation_command: str | None = None,
    model_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    overwrite: bool = False,
) -> Path | None:
    """(Re)write the model card `folder/README.md` of a saved memory LM with what is known about its training.

    Args:
        folder: a folder written by `save_pretrained` (its `config.json` is read).
        training: facts shown as a table, in order, e.g. `{"data": "passkey (bundled text)", "steps": 300,
            "examples": "4 segments of 64 tokens", "trainable": "full"}`.
        evaluation: the results dict of `hf_memlm.evaluation` (`evaluate_retrieval` / `evaluate_perplexity`),
            rendered with `format_markdown`, or a ready Markdown table.
        evaluation_command: the command that produced `evaluation`.
        model_id: the Hub id the card's usage snippet loads (default: the folder's name).
        license, datasets, tags: Hub metadata (`license: apache-2.0`, Hub dataset ids, extra tags).
        overwrite: replace a README.md that hf_memlm did not write (kept by default).

    Returns the card's path, or None when a README.md the user wrote was kept.
    """
    from transformers import AutoConfig  # knows "memlm": importing this module ran hf_memlm/__init__.py

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} holds no config.json; write the model there with save_pretrained first.")
    if json.loads(config_file.read_text()).get("model_type") != "memlm":
        raise ValueError(f"{folder} does not hold an hf_memlm model (config.json model_type is not 'memlm').")
    config = AutoConfig.from_pretrained(folder)
    if isinstance(evaluation, dict):
        evaluation = _evaluation_markdown(evaluation)
    return model_card.write_model_card(
        folder,
        config,
        overwrite=overwrite,
        model_id=model_id or folder.resolve().name,
        training=training,
        evaluation=evaluation,
        evaluation_command=evaluation_command,
        license=license,
        datasets=datasets,
        tags=tags,
    )


def push_trained_model(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload hf_memlm model",
    create_pr: bool = False,
):
    """Upload a trained model folder to the Hub repo `repo_id` (created when missing), in one commit.

    Uploads what `hf-memlm train` saved: weights, `config.json`, the modeling code, the tokenizer, the model
    card, the LoRA adapter and the evaluation report when present; never `checkpoint-*` folders or `_*`
    files (as Trainer's own push). A README.md in the repo that hf_memlm did not write is kept.
    Call it on the main process after the final save (and `write_model_card`). Returns the `CommitInfo`.
    """
    folder = Path(folder)
    missing = [name for name in ("config.json", "modeling_memlm.py") if not (folder / name).is_file()]
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if missing or not has_weights:
        what = missing + ([] if has_weights else ["model weights (*.safetensors)"])
        raise ValueError(f"{folder} is not a saved hf_memlm model: it lacks {', '.join(what)}.")
    return model_card.upload_folder_to_hub(
        folder,
        repo_id,
        ignore_patterns=IGNORED_FOR_UPLOAD,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
    )


class HubCodeCallback(TrainerCallback):
    """Makes the pushes of a training run with `push_to_hub=True` loadable with `trust_remote_code=True`.

    Trainer pushes its output folder after each save (`hub_strategy` `every_save`, `checkpoint`,
    `all_checkpoints`), copying only the weights and config into it from the checkpoint: the modeling
    code that `config.json`'s `auto_map` points to would be missing from the repo. Before each push this
    callback writes the modeling code and the model card into the output folder.
    """

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        from transformers.dynamic_module_utils import custom_object_save

        if model is None or getattr(getattr(model, "config", None), "model_type", None) != "memlm":
            return  # a PEFT adapter (its base is not pushed) or another model: nothing of ours to add
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        custom_object_save(model, str(output_dir), config=model.config)
        model_card.write_model_card(
            output_dir,
            model.config,
            model_id=getattr(args, "hub_model_id", None) or output_dir.resolve().name,
            num_parameters=model_card.parameter_counts(model),
        )


def _evaluation_markdown(results: dict) -> str:
    from hf_memlm.evaluation import format_markdown

    # the report's own headings sit under the card's "## Evaluation"
    return re.sub(r"^# ", "### ", format_markdown(results), flags=re.MULTILINE)


__all__ = ["IGNORED_FOR_UPLOAD", "HubCodeCallback", "push_trained_model", "write_model_card"]
