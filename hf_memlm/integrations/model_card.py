"""The model card (`README.md`) of a memory LM, built with huggingface_hub's `ModelCard`, `ModelCardData` and
`EvalResult` from the Jinja2 template `resources/MODEL_CARD.md`.

Which README.md may be rebuilt, and what a rebuild keeps (`read_card`):
  * ours (it carries `CARD_MARKER`): rebuilt from the config, keeping its metadata (license, datasets, tags,
    `model-index`, any key a user added), its training and evaluation sections, its parameter count and the
    repo id of its snippet, unless new ones are given;
  * the drafts transformers writes by itself (the generic card of `push_to_hub`, Trainer's card): replaced,
    keeping their license, datasets, language and tags;
  * anything else was written by a person and is never replaced.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hf_memlm.memory_kinds import MEMORY_KINDS

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CARD_MARKER = (
    "<!-- hf_memlm model card: generated from the model's config and rebuilt when the model is saved or pushed "
    "again, keeping its metadata and results. Delete this line to keep your edits. -->"
)
TEMPLATE_FILE = Path(__file__).resolve().parents[1] / "resources" / "MODEL_CARD.md"
OUR_TAGS = ("hf_memlm", "custom_code", "memory-augmented", "long-context")
# drafts transformers writes on its own: `PushToHubMixin.push_to_hub` (tokenizer, config) and Trainer
_AUTOMATIC_CARDS = (
    "This model card has been automatically generated.",
    "This model card has been generated automatically according to the information the Trainer had access to",
)
# metadata of those drafts worth keeping; their model-index holds Trainer's losses, not our results
_KEPT_FROM_DRAFTS = ("license", "license_name", "license_link", "datasets", "language", "tags", "base_model")
_NO_TRAINING = "Not recorded with this model."
_NO_EVALUATION = "Not evaluated with this model."
_SECTION = re.compile(r"^## (Training|Evaluation)\n\n(.*?)\n*(?=^## |\Z)", re.MULTILINE | re.DOTALL)
_SNIPPET_ID = re.compile(r'from_pretrained\("([^"\n]+)", trust_remote_code=True\)')
_PARAMETERS_ROW = re.compile(r"^\| parameters \| (.+) \|$", re.MULTILINE)
# `owner/name` or a legacy top-level name such as `gpt2`
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# Hub license ids are lowercase (`apache-2.0`, `mit`, `cc-by-4.0`, `other`)
_LICENSE_ID = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
REPORT_KINDS = ("retrieval", "perplexity", "comparison", "chat_passkey")


@dataclass
class CardFacts:
    """What an existing card says beyond the config, to keep when it is rebuilt (None: it says nothing)."""

    metadata: dict = field(default_factory=dict)
    model_id: str | None = None
    training: str | None = None
    evaluation: str | None = None
    parameters: str | None = None


def is_generated_card(text: str) -> bool:
    """Whether a README.md was written by hf_memlm."""
    return CARD_MARKER.split(":")[0] in text


def read_card(text: str) -> CardFacts | None:
    """The facts of a card hf_memlm may rebuild (ours, or a draft transformers wrote); None for a card a
    person wrote, which must be kept as it is."""
    from huggingface_hub import ModelCard

    ours = is_generated_card(text)
    if not ours and not any(sign in text for sign in _AUTOMATIC_CARDS):
        return None
    try:
        card = ModelCard(text, ignore_metadata_errors=True)
        metadata = card.data.to_dict()
    except (ValueError, yaml.YAMLError):  # metadata that is not a mapping, or not YAML
        card, metadata = None, {}
    if not ours:
        return CardFacts(metadata={key: metadata[key] for key in _KEPT_FROM_DRAFTS if key in metadata})
    sections = {name: body.strip() for name, body in _SECTION.findall(card.text if card else text)}
    snippet = _SNIPPET_ID.search(text)
    parameters = _PARAMETERS_ROW.search(text)
    return CardFacts(
        metadata=metadata,
        model_id=snippet.group(1) if snippet else None,
        training=None if sections.get("Training", _NO_TRAINING) == _NO_TRAINING else sections["Training"],
        evaluation=None if sections.get("Evaluation", _NO_EVALUATION) == _NO_EVALUATION else sections["Evaluation"],
        parameters=parameters.group(1) if parameters else None,
    )


def hub_base_model(config) -> str | None:
    """The Hub id the base model was loaded from (`from_base("owner/name")`), or None when the base was built
    from a config or loaded from a local folder.

    `from_pretrained` records what it was given in the base config's `_name_or_path`, which `config.json`
    keeps; a name that is an existing folder, or not shaped like a Hub id, is a local path."""
    name = getattr(config.text_config, "_name_or_path", None) or ""
    return name if is_hub_id(name) else None


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id rather than a local path."""
    return bool(name) and not os.path.exists(name) and bool(_HUB_ID.match(name)) and ".." not in name


def check_license(license: str | None) -> None:
    if license is not None and not (isinstance(license, str) and _LICENSE_ID.match(license)):
        raise ValueError(
            f"license {license!r} is not a Hub license id: use a lowercase id such as apache-2.0, mit, "
            "cc-by-4.0 or other (the list: https://huggingface.co/docs/hub/repositories-licenses)."
        )


def build_model_card(
    config,
    *,
    model_id: str | None = None,
    previous: CardFacts | None = None,
    training: dict | None = None,
    evaluation=None,
    evaluation_command: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    num_parameters: dict[str, int] | None = None,
):
    """The `huggingface_hub.ModelCard` of a memory LM with `config` (a `MemLMConfig`).

    Args:
        model_id: the Hub id (or folder) the usage snippet loads; default `previous`'s, else "hf_memlm-model".
        previous: the facts of the card being rebuilt (`read_card`): kept where nothing new is given.
        training: facts about training, shown as a table in the order given (e.g. `{"data": "passkey",
            "steps": 300}`).
        evaluation: results of `hf_memlm.evaluation` (a report dict, or a list of them; also a path to a
            report's JSON file), shown as Markdown and written as `model-index` metadata; or a ready
            Markdown table (no `model-index`); an empty list: not evaluated.
        evaluation_command: the command that produced `evaluation` (shown under it).
        license: a Hub license id (`apache-2.0`, ...); datasets: Hub dataset ids; language, tags: Hub metadata.
        num_parameters: `{"total": ..., "memory": ...}` parameter counts.
    """
    from huggingface_hub import ModelCard, ModelCardData

    check_license(license)
    previous = previous or CardFacts()
    model_id = model_id or previous.model_id or "hf_memlm-model"
    title = model_id.rstrip("/").split("/")[-1]
    data = ModelCardData(**previous.metadata, ignore_metadata_errors=True)
    data.library_name, data.pipeline_tag, data.model_name = "transformers", "text-generation", title
    dropped = {"generated_from_trainer", *(f"{kind}-memory" for kind in MEMORY_KINDS)}  # Trainer's, and a kind's
    kept_tags = [tag for tag in data.tags or [] if tag not in dropped]
    data.tags = list(dict.fromkeys([*OUR_TAGS, f"{config.memory_type}-memory", *kept_tags, *(tags or [])]))
    base_id = hub_base_model(config)
    if base_id:
        data.base_model = base_id
    for name, value in (("license", license), ("datasets", datasets), ("language", language)):
        if value:
            setattr(data, name, list(value) if name == "datasets" else value)

    evaluation_section = previous.evaluation
    if evaluation is not None:
        evaluation_section, data.eval_results = evaluation_parts(evaluation, evaluation_command)
    if not data.eval_results:
        data.eval_results = data.model_name = None  # model_name only names the model-index
    training_section = _table(training) if training else previous.training
    values = {
        "marker": CARD_MARKER,
        "title": title,
        "model_id": model_id,
        "base_description": _base_description(config, base_id),
        "memory_type": config.memory_type,
        "memory_layers": ", ".join(str(i) for i in config.memory_layers),
        "segment_length": str(config.segment_length),
        "memory_rows": "\n".join(
            f"| {name} | {value} |" for name, value in _memory_rows(config, num_parameters, previous.parameters)
        ),
        "training_section": training_section or _NO_TRAINING,
        "evaluation_section": evaluation_section or _NO_EVALUATION,
    }
    template = TEMPLATE_FILE.read_text(encoding="utf-8")
    _check_template(template, {"card_data", *values})
    return ModelCard.from_template(data, template_str=template, **values)


def render_model_card(config, **card) -> str:
    """`build_model_card(config, **card)` as the text of README.md."""
    return str(build_model_card(config, **card))


def evaluation_parts(evaluation, command: str | None = None):
    """(Markdown section or None, `EvalResult`s) of an `evaluation` argument (see `build_model_card`)."""
    if isinstance(evaluation, str) and not (evaluation.endswith(".json") and os.path.isfile(evaluation)):
        text = _demote_headings(evaluation.strip())
        return (text + (f"\n\nProduced by: `{command}`" if command else "") if text else None), []
    reports = [evaluation] if isinstance(evaluation, (dict, str, os.PathLike)) else list(evaluation)
    reports = [load_report(report) if isinstance(report, (str, os.PathLike)) else report for report in reports]
    if not reports:
        return None, []
    from hf_memlm.evaluation import format_markdown

    text = "\n\n".join(_demote_headings(format_markdown(report).strip()) for report in reports)
    results = [result for report in reports for result in eval_results(report)]
    return text + (f"\n\nProduced by: `{command}`" if command else ""), results


def load_report(path) -> dict:
    """An evaluation report written by `hf_memlm.evaluation.write_report` (`<task>.json`)."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the evaluation report {path}: {error}") from error
    if not isinstance(report, dict) or report.get("kind") not in REPORT_KINDS:
        raise ValueError(
            f"{path} is not an hf_memlm evaluation report (its `kind` is none of {', '.join(REPORT_KINDS)})."
        )
    return report


def folder_reports(folder) -> list[dict]:
    """The evaluation reports saved with a model (`folder/eval/*.json`, as `hf-memlm train` writes them)."""
    reports = []
    for path in sorted(Path(folder, "eval").glob("*.json")):
        try:
            reports.append(load_report(path))
        except ValueError as error:
            logger.warning("model card: skipping %s", error)
    return reports


def eval_results(report: dict) -> list:
    """`EvalResult`s (the Hub's `model-index`) of the memory model in an hf_memlm evaluation report: the
    results with memory, not the baselines measured beside it (those stay in the Markdown)."""
    from huggingface_hub import EvalResult

    kind, task = report.get("kind"), report.get("task") or report.get("kind")
    found = []

    def add(metric_type, metric_name, value, dataset_type, dataset_name, task_name, **metric_args):
        if value is not None:
            found.append(
                EvalResult(
                    task_type="text-generation",
                    task_name=task_name,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=round(float(value), 4),
                    metric_args=metric_args or None,
                )
            )

    if kind == "retrieval":
        synthetic = (task, f"{task} (synthetic, hf_memlm)", "Retrieval from memory")
        overall = report["overall"]["metrics"]["memory"]
        add("exact_match", "exact match", overall["exact_match"], *synthetic)
        add("accuracy", "accuracy per answer token", overall["token_accuracy"], *synthetic)
        for bucket in report.get("by_distance_segments", []):
            distance = bucket["distance_segments"]
            name = f"exact match, {distance} segment{'' if distance == 1 else 's'} back"
            add("exact_match", name, bucket["metrics"]["memory"]["exact_match"], *synthetic, distance_segments=distance)
    elif kind == "chat_passkey":
        synthetic = (task, "pass key asked in chat (synthetic, hf_memlm)", "Retrieval from memory")
        for row in report.get("rows", []):
            if row.get("needles") == 1:
                tokens = row["distance_tokens"][0]
                add(
                    "exact_match",
                    f"exact match, {tokens:,} tokens back",
                    row["memory"],
                    *synthetic,
                    distance_tokens=tokens,
                )
    elif kind in ("perplexity", "comparison"):
        source = str((report.get("data") or {}).get("source") or "")
        text = (
            (source, source, "Language modelling")
            if is_hub_id(source)
            else ("text", "held-out text", "Language modelling")
        )
        if kind == "perplexity":
            add("perplexity", "perplexity", report["overall"]["perplexity"]["memory"], *text)
        else:
            beyond = report["beyond"]
            name = f"perplexity from segment {beyond['from_segment']} on"
            add("perplexity", name, beyond["perplexity"].get("memory"), *text, from_segment=beyond["from_segment"])
    return found


def parameter_counts(model) -> dict[str, int]:
    """`{"total": ..., "memory": ...}`: parameters of `model` (tied ones once) and those in memory blocks."""
    unique = {id(p): p for p in model.parameters()}
    memory = {id(p) for p in model.memory_blocks.parameters()}
    return {
        "total": sum(p.numel() for p in unique.values()),
        "memory": sum(p.numel() for key, p in unique.items() if key in memory),
    }


def _base_description(config, base_id: str | None) -> str:
    text = config.text_config
    if base_id:
        return f"the [`{base_id}`](https://huggingface.co/{base_id}) base model (`{text.model_type}`)"
    if getattr(text, "_name_or_path", None):
        return f"a pretrained `{text.model_type}` base model loaded from a local folder"
    return f"a `{text.model_type}` base model built from its config"


def _check_template(template: str, known: set[str]) -> None:
    import jinja2
    from jinja2 import meta

    unknown = sorted(meta.find_undeclared_variables(jinja2.Environment().parse(template)) - known)
    if unknown:
        raise ValueError(f"model card template names unknown fields {unknown}; known fields are {sorted(known)}.")


def _memory_rows(config, num_parameters, previous_parameters) -> list[tuple[str, str]]:
    text = config.text_config
    rows = [
        ("base model type", f"`{text.model_type}`"),
        ("memory kind", f"`{config.memory_type}`"),
        ("memory layers", ", ".join(str(i) for i in config.memory_layers)),
        ("segment length (tokens)", str(config.segment_length)),
        ("memory heads x head width", f"{config.memory_heads} x {config.memory_head_dim}"),
    ]
    if config.memory_type in MEMORY_KINDS:  # a kind only a remote payload knows: its own rows are left out
        rows += MEMORY_KINDS[config.memory_type].describe_settings(config)
    if config.memory_dtype:
        rows.append(("memory dtype", config.memory_dtype))
    if config.memory_value_dtype:
        rows.append(("memory value dtype", config.memory_value_dtype))
    if num_parameters and num_parameters.get("total") is not None:
        total, memory = num_parameters["total"], num_parameters.get("memory")
        rows.append(("parameters", f"{total:,}" + (f" ({memory:,} in memory blocks)" if memory is not None else "")))
    elif previous_parameters:
        rows.append(("parameters", previous_parameters))
    return rows


def _table(facts: dict) -> str:
    lines = ["| | value |", "| --- | --- |"]
    lines += [f"| {name} | {_cell(value)} |" for name, value in facts.items()]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _demote_headings(markdown: str) -> str:
    # a report's headings sit under the card's "## Evaluation" (and never end that section early)
    return re.sub(r"^(#{1,2}) ", r"##\1 ", markdown, flags=re.MULTILINE)


__all__ = [
    "CARD_FILE",
    "CARD_MARKER",
    "CardFacts",
    "build_model_card",
    "check_license",
    "eval_results",
    "evaluation_parts",
    "folder_reports",
    "hub_base_model",
    "is_generated_card",
    "load_report",
    "parameter_counts",
    "read_card",
    "render_model_card",
]
