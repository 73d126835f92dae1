"""The `hf-memlm train` config: a YAML file plus `--section.key value` overrides, parsed by jsonargparse.

    hf-memlm train configs/tiny_cpu.yaml --training.learning_rate 1e-3 --model.memory.memory_type slot

jsonargparse reads the YAML, applies the overrides and checks every value against the type annotations of
the classes that consume it, so the schema is those classes:

    output_dir, overwrite_output_dir, seed      top-level options
    model.memory.*                              `MemLMConfig`'s own fields (memory_type, segment_length, ...)
    model.base, model.trainable                 `ModelSection` below; model.base_kwargs and model.text_config
                                                are free mappings, checked by the classes that take them
    lora.*                                      `peft.LoraConfig` fields (model.trainable: lora)
    tokenizer.*, data.*, evaluation.*,          `TokenizerSection`, `DataSection`, `EvaluationSection`,
    comparison.*, card.*                        `ComparisonSection`, `CardSection` below
    training.*                                  `MemLMTrainingArguments` (transformers `TrainingArguments` +
                                                memory_learning_rate, memory_weight_decay, read_loss_weight)

What is ours: those section dataclasses, the keys that must not be set where a user might try
(`EXCLUDED`), and a "Did you mean ...?" for unknown keys, which jsonargparse does not offer.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hf_memlm.data import TASK_BUILDERS
from hf_memlm.training.model_setup import TRAINABLE_MODES

TOKENIZER_KINDS = ("auto", "byte", "bpe", "pretrained")
TRAIN_TASKS = ("text", *TASK_BUILDERS)  # documents packed into examples, or a synthetic task
RETRIEVAL_TASKS = tuple(TASK_BUILDERS)  # tasks the evaluation section measures by retrieval accuracy
EVALUATION_TASKS = (*RETRIEVAL_TASKS, "perplexity", "suite")  # suite: RULER and BABILong (hf-memlm eval --suite)
# models trained beside the memory model for a comparison: name -> attention window in segments
BASELINE_WINDOWS = {"no_memory": 1, "double_window": 2}
# the pretrained base as shipped (model.base), scored beside them without training: name -> attention window in
# segments (None: the whole evaluation example, up to the base's positions)
PRETRAINED_BASELINES = {"base": 1, "full_attention": None}

# keys a user may reach for that belong elsewhere: key -> where to set it instead
EXCLUDED = {
    "training.output_dir": "set the top-level output_dir.",
    "training.seed": "set the top-level seed.",
    "model.memory.text_config": "the base architecture goes in model.text_config (or model.base).",
    "model.memory.tie_word_embeddings": "it follows the base model's config.",
    "lora.task_type": "hf_memlm trains a causal LM.",
    "lora.modules_to_save": "hf_memlm adds the memory blocks itself.",
    "lora.peft_type": "this section is LoRA.",
}
# defaults that differ from `TrainingArguments`' own
TRAINING_DEFAULTS = {"report_to": "none", "prediction_loss_only": True, "logging_steps": 10}


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the config."""


@dataclass
class ModelSection:
    """model.*: what to train (`memory` is added from `MemLMConfig`)."""

    base: str | None = None  # pretrained causal LM (Hub id or folder) to wrap; null: from scratch
    base_kwargs: dict[str, Any] = field(default_factory=dict)  # from_pretrained arguments for `base`
    text_config: dict[str, Any] = field(default_factory=dict)  # from scratch: model_type and its config fields
    trainable: Literal[TRAINABLE_MODES] = "full"  # full, memory_only (base frozen), memory_new (with memory_from:
    # only the memory weights its folder lacks) or lora
    calibrate_tokens: int = 0  # with a base: fit the new memory's input projections to the base's hidden states
    # on this many tokens of the training examples before training (`calibrate_memory`); 0: off
    memory_from: str | None = None  # a trained model's folder (or Hub id) whose memory weights start this one's:
    # a second training stage (weights new here, e.g. per-token key projections, keep their initial values)


@dataclass
class TokenizerSection:
    kind: Literal[TOKENIZER_KINDS] = "auto"  # auto: pretrained with model.base, else byte
    path: str | None = None  # kind=pretrained: folder or Hub id (default: model.base)
    vocab_size: int | None = None  # kind=bpe: vocabulary size to train (default 1024)


@dataclass
class DataSection:
    task: Literal[TRAIN_TASKS] = "text"  # text: documents packed into examples; or a synthetic task
    source: str | None = None  # text: a .txt/.json/.jsonl/.parquet file, a folder or a Hub id; null: bundled book
    # (synthetic tasks: their natural filler)
    text_column: str = "text"  # column holding the text in json/parquet/Hub data
    num_segments: int = 4  # segments per example (num_segments * segment_length tokens)
    num_examples: int = 256  # synthetic tasks: examples to generate
    eval_fraction: float = 0.0  # share of the examples held out for evaluation during training
    options: dict[str, Any] = field(default_factory=dict)  # extra arguments of the task generator


@dataclass
class EvaluationSection:
    """evaluation.*: measured on the saved model right after training (null task: none)."""

    task: Literal[(None, *EVALUATION_TASKS)] = None
    num_segments: list[int] = field(default_factory=lambda: [2, 5, 9, 17])  # retrieval: the distance grid;
    # perplexity: one example length
    num_examples: int = 100  # retrieval: examples per length; perplexity: windows taken evenly over the text
    source: str | None = None  # held-out text (file or folder): perplexity: the documents scored; passkey,
    # recall, copy, update: the natural filler (null: the bundled excerpt)
    seed: int = 1000  # seed of the evaluation data (keep it apart from the training seed)
    batch_size: int = 16  # examples per forward pass
    check_generate: int = 4  # answers also decoded with model.generate as a cross-check
    options: dict[str, Any] = field(default_factory=dict)  # extra arguments of the task generator


@dataclass
class ComparisonSection:
    """comparison.*: models trained beside the memory model, on the same examples, steps and schedule, and
    scored with it (evaluation.task: perplexity)."""

    baselines: list[Literal[(*BASELINE_WINDOWS, *PRETRAINED_BASELINES)]] = field(default_factory=list)  # trained:
    # no_memory, the base reading windows of segment_length tokens (equal compute); double_window, windows of
    # 2 x segment_length. With model.base, untrained: base, the base as shipped in windows of segment_length;
    # full_attention, the base as shipped attending over each whole evaluation example (the ceiling)
    repeats: int = 1  # train every model this many times, with seeds seed, seed + 1, ...


@dataclass
class CardSection:
    """card.*: Hub metadata of the model card written after training (and pushed with training.push_to_hub)."""

    license: str | None = None  # a Hub license id: apache-2.0, mit, cc-by-4.0, other, ...
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids trained on (default: data.source when it
    # is a Hub id)


def check_card(config: dict) -> None:
    """The card section: a Hub license id and Hub dataset ids."""
    from hf_memlm.integrations.model_card import check_license, is_hub_id

    card = config.get("card") or {}
    try:
        check_license(card.get("license"))
    except ValueError as error:
        raise ValueError(f"card.{error}") from None
    for name in card.get("datasets") or []:
        if not is_hub_id(name):
            raise ValueError(
                f"card.datasets: {name!r} is not a Hub dataset id (owner/name, e.g. pg19 or emozilla/pg19)."
            )


def card_datasets(config: dict) -> list[str]:
    """card.datasets, else the training corpus when it is a Hub dataset."""
    from hf_memlm.data.corpus import _is_local_path
    from hf_memlm.integrations.model_card import is_hub_id

    listed = list((config.get("card") or {}).get("datasets") or [])
    source = config["data"].get("source")
    if not listed and config["data"]["task"] == "text" and isinstance(source, str) and not _is_local_path(source):
        listed = [source] if is_hub_id(source) else []
    return listed


def build_parser():
    """The jsonargparse parser of the train config (its keys are the schema)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    from peft import LoraConfig

    from hf_memlm import MemLMConfig
    from hf_memlm.training.trainer import MemLMTrainingArguments

    parser = ArgumentParser(prog="hf-memlm train", exit_on_error=False, default_meta=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_argument("--output_dir", type=str, default="outputs/train", help="folder for the model and checkpoints")
    parser.add_argument("--overwrite_output_dir", type=bool, default=False, help="train into a folder with files")
    parser.add_argument("--seed", type=int, default=0, help="seed of model init, data generation and data order")
    parser.add_class_arguments(ModelSection, "model")
    parser.add_class_arguments(MemLMConfig, "model.memory", skip=_excluded_fields(MemLMConfig, "model.memory"))
    parser.add_class_arguments(LoraConfig, "lora", skip=_excluded_fields(LoraConfig, "lora"))
    parser.add_class_arguments(TokenizerSection, "tokenizer")
    parser.add_class_arguments(DataSection, "data")
    parser.add_class_arguments(EvaluationSection, "evaluation")
    parser.add_class_arguments(ComparisonSection, "comparison")
    parser.add_class_arguments(CardSection, "card")
    parser.add_class_arguments(
        MemLMTrainingArguments, "training", skip=_excluded_fields(MemLMTrainingArguments, "training")
    )
    parser.set_defaults({f"training.{key}": value for key, value in TRAINING_DEFAULTS.items()})
    return parser


def _excluded_fields(cls, section: str) -> set[str]:
    """Fields of `cls` that are not keys of `section`: the excluded ones and, for `MemLMConfig`, those it
    inherits from `PreTrainedConfig` (only the memory settings belong in model.memory)."""
    excluded = {key.rsplit(".", 1)[1] for key in EXCLUDED if key.startswith(section + ".")}
    names = {f.name for f in dataclasses.fields(cls)}
    if section == "model.memory":
        own = set(inspect.get_annotations(cls))
        excluded |= {name for name in names if name not in own}
    return excluded | {name for name in names if name.startswith("_")}


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """YAML file + `--section.key value` overrides -> the resolved config as nested dicts.

    Unknown keys, excluded keys and values of the wrong type raise `ConfigError` naming the key. In the
    `training` and `lora` sections only the values that differ from the class defaults are kept.
    """
    overrides = list(overrides or [])
    raw = _read_yaml(path)
    parser = build_parser()
    overrides = _joined_overrides(overrides)
    given = [*_flat_keys(raw), *(item[2:].partition("=")[0] for item in overrides)]
    _check_keys(given, parser)
    _refuse_class_paths(raw, overrides, parser)
    from jsonargparse import ArgumentError

    try:
        namespace = parser.parse_args(["--config", str(path), *overrides])
    except (ArgumentError, ValueError, TypeError) as error:
        raise ConfigError(_clean_message(str(error))) from None
    config = namespace.as_dict()
    config.pop("config", None)
    defaults = parser.get_defaults().as_dict()
    for section in ("training", "lora"):
        config[section] = {
            key: value
            for key, value in config[section].items()
            if value != _plain(defaults[section].get(key))
            or f"{section}.{key}" in given
            or (section == "training" and key in TRAINING_DEFAULTS)
        }
    return config


def _plain(value):
    # jsonargparse describes a nested config object (LoraConfig.loftq_config) by class path and arguments
    if isinstance(value, dict) and "class_path" in value:
        return value.get("init_args", {})
    return value


def dump_config(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def _read_yaml(path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; pass a YAML file (see configs/).")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`."
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys to values, got {type(data).__name__}."
        )
    return data


def _flat_keys(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, dict):
            keys.extend(_flat_keys(value, name + "."))
    return keys


def _joined_overrides(overrides: list[str]) -> list[str]:
    """`["--a.b", "1", "--c=x"]` -> `["--a.b=1", "--c=x"]`: one token per override, so a value such as
    `-1e-3` is never taken for an option."""
    joined, index = [], 0
    while index < len(overrides):
        item = overrides[index]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(
                f"unexpected argument {item!r}: overrides are written --section.key value "
                "(e.g. --training.max_steps 10)."
            )
        key, has_value, _ = item[2:].partition("=")
        if not has_value:
            following = overrides[index + 1] if index + 1 < len(overrides) else None
            if following is None or (following.startswith("--") and len(following) > 2):
                raise ConfigError(f"--{key} needs a value (e.g. --{key} VALUE).")
            item = f"--{key.replace('-', '_')}={following}"
            index += 1
        else:
            item = f"--{key.replace('-', '_')}={item.partition('=')[2]}"
        joined.append(item)
        index += 1
    return joined


def _check_keys(keys: list[str], parser) -> None:
    """Unknown and excluded keys, named with the nearest known key (what jsonargparse's errors lack)."""
    leaves = set(parser.get_defaults().keys())
    free = {key for key in leaves if _is_free_mapping(parser, key)}
    sections = {leaf.rsplit(".", i)[0] for leaf in leaves for i in range(1, leaf.count(".") + 1)}
    for key in keys:
        if key in EXCLUDED:
            raise ConfigError(f"{key} cannot be set here: {EXCLUDED[key]}")
        if key in leaves or key in sections or any(key.startswith(f + ".") for f in free):
            continue
        raise ConfigError(_unknown_key_message(key, leaves | sections))


def _refuse_class_paths(raw: dict, overrides: list[str], parser) -> None:
    """jsonargparse imports the module named by a `class_path` (or a dotted name given for a class-typed
    value) to build it: a config must not make `hf-memlm train` import arbitrary code. Nested settings are
    given as plain mappings instead (lora.loftq_config: {loftq_bits: 4})."""
    dests = {action.dest for action in parser._actions}
    class_typed = {dest for dest in dests if f"{dest}.help" in dests}  # jsonargparse's class-path help entries
    values = [("", raw)]
    for item in overrides:
        key, _, text = item[2:].partition("=")
        try:
            values.append((key, yaml.safe_load(text)))
        except yaml.YAMLError:
            values.append((key, text))
    while values:
        key, value = values.pop()
        if set(key.split(".")) & {"class_path", "__path__", "_target_"}:
            raise ConfigError(
                f"{key} is not accepted: the train config never imports code by name. Give the settings as a plain "
                "mapping of values instead (e.g. --lora.loftq_config '{loftq_bits: 4}')."
            )
        if key in class_typed and isinstance(value, str):
            raise ConfigError(
                f"{key}={value!r} is not accepted: a name given here would be imported as code. Give the settings "
                f"of {key} as a plain mapping of values instead (e.g. --lora.loftq_config '{{loftq_bits: 4}}')."
            )
        if isinstance(value, dict):
            for name, inner in value.items():
                where = f"{key}.{name}" if key else str(name)
                if name in ("class_path", "__path__", "_target_"):
                    raise ConfigError(
                        f"{where}={inner!r} is not accepted: the train config never imports code by name. Give the "
                        f"settings of {key or 'this section'} as a plain mapping of values instead "
                        "(e.g. --lora.loftq_config '{loftq_bits: 4}')."
                    )
                values.append((where, inner))
        elif isinstance(value, list):
            values.extend((key, inner) for inner in value)


def _is_free_mapping(parser, key: str) -> bool:
    action = next((a for a in parser._actions if a.dest == key), None)
    return action is not None and "dict" in str(getattr(action, "_typehint", ""))


def _unknown_key_message(key: str, known: set[str]) -> str:
    section, _, name = key.rpartition(".")
    where = f"in section '{section}'" if section else "at the top level"
    siblings = sorted(k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section)
    close = difflib.get_close_matches(name, siblings, n=3, cutoff=0.6)
    if close:
        suggestions = [f"{section}.{c}" if section else c for c in close]
    else:  # maybe the right key in another section (--learning_rate for --training.learning_rate)
        suggestions = sorted(k for k in known if k.rpartition(".")[2] == name)
        suggestions = suggestions or difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.75)
    message = f"unknown config key '{key}' ({where})."
    if suggestions:
        return message + " Did you mean " + " or ".join(f"'{s}'" for s in suggestions) + "?"
    return message + (f" Valid keys here: {', '.join(siblings[:40])}." if siblings else "")


_KEY = re.compile(r'Parser key "(?P<key>[^"]+)"')
_EXPECTED = re.compile(r"Expected a (?P<type>typing\.Literal\[[^\]]*\]|<class '[^']+'>)")
_GIVEN = re.compile(r"(?:Given value|Got value): (?P<value>[^\n]*)")
_TYPE_NAMES = {
    "<class 'int'>": "an integer",
    "<class 'float'>": "a number",
    "<class 'bool'>": "true/false",
    "<class 'str'>": "text",
    "<class 'NoneType'>": "null",
}


def _clean_message(message: str) -> str:
    """jsonargparse's type errors, reworded as `key='value' is not valid: expected ...`; others as they are."""
    key, given = _KEY.search(message), _GIVEN.search(message)
    expected = [_describe(match["type"]) for match in _EXPECTED.finditer(message)]
    if key is None or given is None or not expected:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    return f"{key['key']}={given['value'].strip()!r} is not valid: expected {' or '.join(dict.fromkeys(expected))}."


def _describe(type_text: str) -> str:
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", type_text)
    if literal:
        return "one of " + literal[1].replace("'", "")
    return _TYPE_NAMES.get(type_text, type_text)


__all__ = [
    "BASELINE_WINDOWS",
    "EVALUATION_TASKS",
    "EXCLUDED",
    "PRETRAINED_BASELINES",
    "RETRIEVAL_TASKS",
    "TRAINABLE_MODES",
    "TRAIN_TASKS",
    "ComparisonSection",
    "ConfigError",
    "DataSection",
    "EvaluationSection",
    "ModelSection",
    "TokenizerSection",
    "build_parser",
    "dump_config",
    "load_train_config",
]
