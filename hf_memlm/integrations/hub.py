"""Share a memory LM on the Hugging Face Hub: its model card, the uploads, and pushes during training that carry
the modeling code. The card itself is built in `model_card.py`.

The model's own `save_pretrained` and `push_to_hub` (the payload's `hub_sharing.py`) call `write_card_on_save`
and `push_model` here when hf_memlm is installed. What `hf-memlm train` does with the rest:

    # after the final save (and the evaluation, when configured)
    write_model_card(output_dir, training={"data": ..., "steps": ...}, evaluation=report, license="apache-2.0")
    if training_args.push_to_hub:
        push_trained_model(output_dir, hub_model_id, token=training_args.hub_token, ...)

    # while training with `push_to_hub: true` (Trainer's `hub_strategy`)
    trainer = MemLMTrainer(..., callbacks=[HubCodeCallback()])
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from hf_memlm.integrations.model_card import (
    CARD_FILE,
    CardFacts,
    build_model_card,
    folder_reports,
    is_hub_id,
    parameter_counts,
    read_card,
)

logger = logging.getLogger(__name__)

# Never uploaded from a training folder: Trainer's own exclusions (checkpoints, `_*`), hidden and partial files.
IGNORED_FOR_UPLOAD = ["checkpoint-*", "checkpoint-*/**", "_*", ".*", "*.partial"]
DEFAULT_COMMIT_MESSAGE = "Upload hf_memlm model"


def write_model_card(
    folder: str | Path,
    *,
    training: dict | None = None,
    evaluation=None,
    evaluation_command: str | None = None,
    model_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    overwrite: bool = False,
) -> Path | None:
    """(Re)write the model card `folder/README.md` of a saved memory LM with what is known about it.

    What is not given is kept from the card already there (license, datasets, tags, results, the repo id its
    snippet loads; see `model_card.py`), so a later `save_pretrained` or push never loses it.

    Args:
        folder: a folder written by `save_pretrained` (its `config.json` is read).
        training: facts shown as a table, in order, e.g. `{"data": "passkey (bundled text)", "steps": 300}`.
        evaluation: the results of `hf_memlm.evaluation` (a report dict or a list of them, or paths to their
            JSON files), written as Markdown and as `model-index` metadata; or a ready Markdown table; `[]`:
            not evaluated. None: the card's results, else the reports saved in `folder/eval/*.json`.
        evaluation_command: the command that produced `evaluation`.
        model_id: the Hub id the card's usage snippet loads (default: the card's, else the folder's name).
        license, datasets, language, tags: Hub metadata (`license: apache-2.0`, Hub dataset ids, extra tags).
        overwrite: replace a README.md that a person wrote (kept by default).

    Returns the card's path, or None when a README.md a person wrote was kept.
    """
    card = {"training": training, "evaluation": evaluation, "evaluation_command": evaluation_command}
    card.update(model_id=model_id, license=license, datasets=datasets, language=language, tags=tags)
    return _write_card(folder, overwrite=overwrite, **card)


def write_card_on_save(model, folder) -> Path | None:
    """What the model's `save_pretrained` calls after saving into `folder`: the card, built from the model's
    config and merged with the card already there."""
    return _write_card(folder, model.config, num_parameters=parameter_counts(model))


def push_model(
    model,
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
    datasets: list[str] | None = None,
):
    """`model.push_to_hub(repo_id, ...)`: upload the weights, `config.json`, the modeling code and the model
    card (for `repo_id`) in one commit; returns the `CommitInfo`."""
    tags = list(dict.fromkeys([*(getattr(model, "model_tags", None) or []), *(tags or [])]))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return upload_folder_to_hub(
            folder,
            repo_id,
            card={"tags": tags, "license": license, "datasets": datasets},
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def push_trained_model(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    create_pr: bool = False,
    license: str | None = None,
    datasets: list[str] | None = None,
):
    """Upload a trained model folder to the Hub repo `repo_id` (created when missing), in one commit.

    Uploads what `hf-memlm train` saved: weights, `config.json`, the modeling code, the tokenizer, the model
    card (rebuilt for `repo_id`: its snippet loads the repo), the LoRA adapter and the evaluation report when
    present; never `checkpoint-*` folders or `_*` files (as Trainer's own push). A README.md in the repo that
    a person wrote is kept. Call it on the main process after the final save. Returns the `CommitInfo`.
    """
    folder = Path(folder)
    missing = [name for name in ("config.json", "modeling_memlm.py") if not (folder / name).is_file()]
    has_weights = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    if missing or not has_weights:
        what = missing + ([] if has_weights else ["model weights (*.safetensors)"])
        raise ValueError(f"{folder} is not a saved hf_memlm model: it lacks {', '.join(what)}.")
    return upload_folder_to_hub(
        folder,
        repo_id,
        card={"license": license, "datasets": datasets},
        ignore_patterns=IGNORED_FOR_UPLOAD,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
    )


def upload_folder_to_hub(
    folder,
    repo_id: str,
    *,
    card: dict | None = None,
    ignore_patterns: list[str] | None = None,
    private=None,
    token=None,
    revision=None,
    **commit,
):
    """Create the Hub repo `repo_id` if needed and upload the saved model in `folder` in one commit; returns
    the `CommitInfo`.

    The folder's card is first rebuilt for the repo's full id (`write_model_card` arguments in `card`), keeping
    what the card in the folder and the one in the repo say. A README.md in the repo that a person wrote is
    kept (the folder's is left out of the upload). Files matching `ignore_patterns` (and hidden or `*.partial`
    files) are not uploaded. `commit`: `commit_message`, `commit_description`, `create_pr`."""
    from transformers.utils.hub import hf_api

    api = hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    ignore = ["*.partial", ".*", *(ignore_patterns or [])]
    remote_text = _remote_card(api, repo_id, token=token, revision=revision)
    remote = read_card(remote_text) if remote_text is not None else None
    if remote_text is not None and remote is None:
        logger.warning("%s already has a README.md that hf_memlm did not write; keeping it.", repo_id)
        ignore.append(CARD_FILE)
    else:
        given = {name: value for name, value in (card or {}).items() if value}
        _write_card(folder, remote=remote, **{**given, "model_id": repo_id})
    commit = {name: value for name, value in commit.items() if value is not None}
    commit.setdefault("commit_message", DEFAULT_COMMIT_MESSAGE)
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), token=token, revision=revision, ignore_patterns=ignore, **commit
    )


def write_trainer_card(
    trainer, *, license=None, tags=None, dataset_tags=None, dataset=None, language=None, **unused
) -> bool:
    """What `MemLMTrainer.create_model_card` writes (Trainer calls it in `push_to_hub`, right before the
    upload): our card for the trainer's repo, with its training facts. The Hub dataset ids are `dataset_tags`,
    as in Trainer's card (else `dataset`). Returns False for a model that is not a whole memory LM (a PEFT
    adapter), whose card Trainer writes."""
    from hf_memlm.integrations.lora import is_peft_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    if is_peft_model(model) or getattr(getattr(model, "config", None), "model_type", None) != "memlm":
        return False
    _write_card(
        trainer.args.output_dir,
        model.config,
        model_id=getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id,
        training=training_facts(trainer),
        license=license,
        datasets=_as_list(dataset_tags or dataset),
        language=language,
        tags=_as_list(tags),
        num_parameters=parameter_counts(model),
    )
    return True


def create_trainer_card(trainer, *args, **kwargs) -> None:
    """`Trainer.create_model_card` for a memory LM: our card (`write_trainer_card`) from the arguments
    `push_to_hub` passes on; a PEFT adapter gets Trainer's own card, which PEFT then updates."""
    from transformers import Trainer

    if not trainer.is_world_process_zero():
        return
    names = ("language", "license", "tags", "model_name", "finetuned_from", "tasks", "dataset_tags", "dataset")
    if not write_trainer_card(trainer, **dict(zip(names, args)), **kwargs):
        Trainer.create_model_card(trainer, *args, **kwargs)


def _pushing_trainer():
    """The Trainer whose `push_to_hub` (or checkpoint push) raised the `on_push_begin` being handled: the
    event reaches a callback through `CallbackHandler.call_event`, a few frames below the Trainer's method."""
    from transformers import Trainer

    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    return None


def training_facts(trainer) -> dict:
    """The card's training table from a Trainer's arguments and state."""
    args, state = trainer.args, trainer.state
    facts = {"steps": state.global_step, "learning rate": args.learning_rate}
    if getattr(args, "memory_learning_rate", None) is not None:
        facts["memory learning rate"] = args.memory_learning_rate
    facts["batch size"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    if losses:
        facts["final training loss"] = round(losses[-1], 4)
    return facts


class HubCodeCallback(TrainerCallback):
    """Makes the pushes of a training run with `push_to_hub=True` loadable with `trust_remote_code=True`.

    Trainer pushes its output folder after each save (`hub_strategy` `every_save`, `checkpoint`,
    `all_checkpoints`), copying only the weights and config into it from the checkpoint: the modeling
    code that `config.json`'s `auto_map` points to would be missing from the repo. Before each push this
    callback writes the modeling code and the model card (for the repo's id) into the output folder.

    `trainer.push_to_hub()` writes the trainer's card after every callback has run, and Trainer hands its
    callbacks no reference to itself: so the callback finds the Trainer whose push raised the event and, when
    its class writes Trainer's generic card (a plain `Trainer`), has it write ours instead, as `MemLMTrainer`
    does. A trainer class with its own card (TRL's) keeps it.
    """

    def __init__(self):
        self._repo_ids = {}

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        from transformers.dynamic_module_utils import custom_object_save

        if model is None or getattr(getattr(model, "config", None), "model_type", None) != "memlm":
            return  # a PEFT adapter (its base is not pushed) or another model: nothing of ours to add
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        custom_object_save(model, str(output_dir), config=model.config)
        _write_card(output_dir, model.config, model_id=self._repo_id(args), num_parameters=parameter_counts(model))
        from transformers import Trainer

        trainer = _pushing_trainer()
        if trainer is not None and type(trainer).create_model_card is Trainer.create_model_card:
            # An instance attribute, so only this trainer changes (what MemLMTrainer's method does)
            trainer.create_model_card = functools.partial(create_trainer_card, trainer)

    def _repo_id(self, args) -> str:
        # Trainer names the repo `hub_model_id` or the output folder and resolves the owner when creating it
        name = args.hub_model_id or Path(args.output_dir).absolute().name
        if "/" not in name and name not in self._repo_ids:
            from transformers.utils.hub import hf_api

            created = hf_api().create_repo(name, token=args.hub_token, private=args.hub_private_repo, exist_ok=True)
            self._repo_ids[name] = created.repo_id
        return self._repo_ids.get(name, name)


def _write_card(folder, config=None, *, remote: CardFacts | None = None, overwrite: bool = False, **card):
    """Build `folder/README.md` from `config` (default: the folder's `config.json`) and `card`
    (`build_model_card` arguments), keeping what the card there (and `remote`, the repo's) says."""
    folder = Path(folder)
    path = folder / CARD_FILE
    previous = None
    if path.is_file():
        previous = read_card(path.read_text(encoding="utf-8", errors="replace"))
        if previous is None and not overwrite:
            logger.warning(
                "%s was not written by hf_memlm; keeping it (the generated model card is not written). Delete it, "
                "or pass overwrite=True, to get the generated card.",
                path,
            )
            return None
    previous = _merge(previous, remote)
    if card.get("evaluation") is None and (previous is None or previous.evaluation is None):
        card["evaluation"] = folder_reports(folder) or None
    if not card.get("model_id") and not (previous and _is_repo_id(previous.model_id)):
        card["model_id"] = folder.resolve().name
    model_card = build_model_card(config if config is not None else _saved_config(folder), previous=previous, **card)
    model_card.save(path)
    return path


def _saved_config(folder: Path):
    from transformers import AutoConfig  # knows "memlm": importing this module ran hf_memlm/__init__.py

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} holds no config.json; write the model there with save_pretrained first.")
    if json.loads(config_file.read_text()).get("model_type") != "memlm":
        raise ValueError(f"{folder} does not hold an hf_memlm model (config.json model_type is not 'memlm').")
    return AutoConfig.from_pretrained(folder)


def _merge(local: CardFacts | None, remote: CardFacts | None) -> CardFacts | None:
    """The folder's card first, then the repo's for what the folder's does not say."""
    if local is None or remote is None:
        return local or remote
    metadata = {**remote.metadata, **local.metadata}
    tags = [*(local.metadata.get("tags") or []), *(remote.metadata.get("tags") or [])]
    if tags:
        metadata["tags"] = list(dict.fromkeys(tags))
    return CardFacts(
        metadata=metadata,
        model_id=local.model_id or remote.model_id,
        training=local.training or remote.training,
        evaluation=local.evaluation or remote.evaluation,
        parameters=local.parameters or remote.parameters,
    )


def _as_list(value) -> list | None:
    return [value] if isinstance(value, str) else value


def _is_repo_id(name: str | None) -> bool:
    # `owner/name`: a repo the card was pushed to (a bare name is a folder's)
    return bool(name) and "/" in name and is_hub_id(name)


def _remote_card(api, repo_id: str, token=None, revision: str | None = None) -> str | None:
    """The README.md in the Hub repo `repo_id`, or None when it has none."""
    if not api.file_exists(repo_id, CARD_FILE, revision=revision, token=token):
        return None
    local = api.hf_hub_download(repo_id, CARD_FILE, revision=revision, token=token)
    return Path(local).read_text(encoding="utf-8", errors="replace")


__all__ = [
    "IGNORED_FOR_UPLOAD",
    "HubCodeCallback",
    "push_model",
    "push_trained_model",
    "training_facts",
    "upload_folder_to_hub",
    "write_card_on_save",
    "write_model_card",
    "write_trainer_card",
]
