"""The model card built by hf_memlm.integrations.model_card: Hub metadata through huggingface_hub's ModelCard, evaluation
results as `model-index`, and what a later save keeps (no Hub here; pushes are in test_hub_sharing.py)."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import build
from huggingface_hub import ModelCard, ModelCardData
from transformers.modelcard import TrainingSummary

import hf_memlm
from hf_memlm.integrations.hub import write_model_card
from hf_memlm.integrations.model_card import CARD_MARKER


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, text[:200]
    return yaml.safe_load(match.group(1))


@pytest.fixture(scope="module")
def passkey_report():
    """A real retrieval report of a tiny model (segments of 64 tokens, keys 1 and 2 segments back)."""
    from hf_memlm.data import build_tokenizer
    from hf_memlm.evaluation import evaluate_retrieval, retrieval_dataset
    from hf_memlm.recipes.defaults import tiny_llama_config

    config = hf_memlm.MemLMConfig(text_config=tiny_llama_config(), memory_layers=[0], segment_length=64)
    model = hf_memlm.MemLMForCausalLM(config).eval()
    data = retrieval_dataset("passkey", build_tokenizer("byte"), 4, 64, [2, 3], seed=0)
    return evaluate_retrieval(model, data, batch_size=4, task="passkey", progress=False)


def test_the_card_carries_the_hub_metadata_users_expect(tmp_path):
    build("llama", "slot").save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"custom_code", "hf_memlm", "slot-memory"} <= set(card.data.tags)
    assert card.data.get("model_name") is None and card.data.eval_results is None  # no results: no model-index


def test_saving_again_keeps_what_write_model_card_put_in(tmp_path, passkey_report):
    """license, datasets, extra tags, the training table, the results (Markdown and model-index) and the repo id of
    the snippet survive a later save_pretrained into the same folder."""
    model = build("llama", "kv")
    folder = tmp_path / "run"
    model.save_pretrained(folder)
    write_model_card(
        folder,
        license="apache-2.0",
        datasets=["emozilla/pg19"],
        tags=["my-tag"],
        training={"data": "passkey", "steps": 300},
        evaluation=passkey_report,
        model_id="me/run",
    )
    written = (folder / "README.md").read_text()
    model.save_pretrained(folder)
    again = (folder / "README.md").read_text()
    meta = _front_matter(again)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["emozilla/pg19"] and "my-tag" in meta["tags"]
    assert meta["model-index"] == _front_matter(written)["model-index"]
    assert "| steps | 300 |" in again and "### passkey" in again and "| **all** |" in again
    assert '"me/run", trust_remote_code=True' in again
    assert again == written  # nothing lost, nothing doubled
    # what is given anew replaces what was there
    write_model_card(folder, license="mit", evaluation=[])
    meta = _front_matter((folder / "README.md").read_text())
    assert meta["license"] == "mit" and "model-index" not in meta
    assert "Not evaluated with this model." in (folder / "README.md").read_text()


def test_evaluation_reports_become_model_index_results(tmp_path, passkey_report):
    """The memory model's results in the reports of eval/*.json (as hf-memlm train writes them) become EvalResults;
    the baselines stay in the Markdown."""
    from hf_memlm.evaluation import write_report

    folder = tmp_path / "run"
    build("llama", "kv").save_pretrained(folder)
    write_report(passkey_report, folder / "eval")
    write_model_card(folder, evaluation_command="hf-memlm eval run --task passkey")
    card = ModelCard.load(folder / "README.md")
    results = {result.metric_name: result for result in card.data.eval_results}
    overall = passkey_report["overall"]["metrics"]["memory"]
    assert results["exact match"].metric_type == "exact_match"
    assert results["exact match"].metric_value == pytest.approx(overall["exact_match"], abs=1e-4)
    assert results["accuracy per answer token"].metric_value == pytest.approx(overall["token_accuracy"], abs=1e-4)
    distances = [bucket["distance_segments"] for bucket in passkey_report["by_distance_segments"]]
    for distance in distances:
        name = f"exact match, {distance} segment{'' if distance == 1 else 's'} back"
        assert results[name].metric_args == {"distance_segments": distance}
    assert {r.dataset_type for r in card.data.eval_results} == {"passkey"}
    assert {r.task_type for r in card.data.eval_results} == {"text-generation"}
    assert card.data.model_name == "run"  # the model-index names the model
    assert "memory disabled" in card.text and "Produced by: `hf-memlm eval run --task passkey`" in card.text


def test_a_perplexity_comparison_report_gives_the_memory_models_perplexity():
    from hf_memlm.evaluation.comparison import compare_perplexity
    from hf_memlm.integrations.model_card import eval_results

    measurements = {
        name: {"label": name, "description": name, "seeds": [0], "counts": [10, 10, 10], "nll": [nll]}
        for name, nll in (("memory", [2.0, 1.5, 1.0]), ("no_memory", [2.0, 2.0, 2.0]))
    }
    report = compare_perplexity(measurements, reference="no_memory", segment_length=8, num_examples=1, beyond_segment=1)
    report["data"] = {"source": "emozilla/pg19"}
    (result,) = eval_results(report)
    assert result.metric_type == "perplexity" and result.dataset_type == "emozilla/pg19"
    assert result.metric_value == pytest.approx(report["beyond"]["perplexity"]["memory"], abs=1e-4)
    assert result.metric_args == {"from_segment": 1}


def test_drafts_transformers_wrote_are_replaced_keeping_their_metadata(tmp_path):
    """Trainer's card and push_to_hub's generic card are drafts: saving replaces them with ours (their license and
    datasets kept); a card a person wrote is never replaced."""
    model = build("llama", "kv")
    trainer_card = TrainingSummary(
        model_name="run", license="mit", dataset_tags=["emozilla/pg19"], tags=["generated_from_trainer"]
    ).to_model_card()
    generic = ModelCard.from_template(
        ModelCardData(license="cc-by-4.0", library_name="transformers"),
        model_description="This is the model card of a 🤗 transformers model that has been pushed on the Hub. "
        "This model card has been automatically generated.",
    )
    for name, draft, license in (("trainer", trainer_card, "mit"), ("generic", str(generic), "cc-by-4.0")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "README.md").write_text(draft)
        model.save_pretrained(folder)
        card = (folder / "README.md").read_text()
        meta = _front_matter(card)
        assert CARD_MARKER in card and meta["license"] == license and "custom_code" in meta["tags"], name
        assert "generated_from_trainer" not in meta["tags"]
    assert _front_matter((tmp_path / "trainer" / "README.md").read_text())["datasets"] == ["emozilla/pg19"]


def test_a_license_that_is_not_a_hub_id_is_refused(tmp_path):
    build("llama", "kv").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"license 'Apache 2\.0' is not a Hub license id: use a lowercase id"):
        write_model_card(tmp_path, license="Apache 2.0")


def test_hf_memlm_train_card_section_is_checked(tmp_path, capsys):
    from pathlib import Path

    from hf_memlm.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "passkey_cpu.yaml")
    out = ["--output_dir", str(tmp_path / "out")]
    assert main(["train", config, "--card.license", "Apache 2.0", "--dry-run", *out]) != 0
    assert "card.license 'Apache 2.0' is not a Hub license id" in capsys.readouterr().err
    assert main(["train", config, "--card.datasets", "[../my data]", "--dry-run", *out]) != 0
    assert "card.datasets: '../my data' is not a Hub dataset id" in capsys.readouterr().err
    assert main(["train", config, "--card.license", "apache-2.0", "--dry-run", *out]) == 0
    assert "license: apache-2.0" in capsys.readouterr().out


def test_a_card_of_ours_with_broken_metadata_is_rebuilt(tmp_path):
    """Metadata a person broke by hand in our card (not YAML) does not stop the save; the card is rebuilt."""
    model = build("llama", "kv")
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    (tmp_path / "README.md").write_text(text.replace("library_name: transformers", "library_name: [unclosed", 1))
    model.save_pretrained(tmp_path)
    assert _front_matter((tmp_path / "README.md").read_text())["library_name"] == "transformers"
