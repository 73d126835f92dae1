"""Language modelling against fair baselines: models trained without memory on the same data, scored on the
same held-out predictions by segment position (`hf_memlm.evaluation.comparison`, `hf_memlm.recipes.comparison`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import BASES, KINDS, build

from hf_memlm.cli import main
from hf_memlm.evaluation.comparison import compare_perplexity, segment_nll
from hf_memlm.recipes.comparison import WindowCollator, prepare_baseline
from hf_memlm.recipes.config import load_train_config
from hf_memlm.recipes.pipeline import check_config
from hf_memlm.recipes.train import prepare_run

ROOT = Path(__file__).resolve().parents[1]
BOOKS = ROOT / "data" / "books"


@pytest.mark.parametrize("model_type", list(BASES))
@pytest.mark.parametrize("kind", KINDS)
def test_memory_disabled_equals_the_base_reading_windows_of_one_segment(model_type, kind):
    """The two ways of scoring a model without memory agree: the memory model inside memory_disabled() and its
    base model reading each segment on its own give the same per-segment NLL."""
    model = build(model_type, kind)
    length = model.config.segment_length
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(1, 60, (3, 3 * length + 2), generator=generator).tolist()
    disabled, counts = segment_nll(model, rows, length, use_memory=False)
    windows, same_counts = segment_nll(model.language_model, rows, length, window=length)
    assert counts == same_counts == [3 * length] * 3 + [3]
    assert disabled == pytest.approx(windows, rel=1e-5)
    with_memory, _ = segment_nll(model, rows, length)
    assert with_memory[0] == pytest.approx(disabled[0], rel=1e-5)  # nothing to read in the first segment
    assert with_memory[1:] != pytest.approx(disabled[1:], rel=1e-3)  # randomized memory changes the rest


def test_window_nll_sees_only_its_window():
    """A prediction of the window model depends on its own window only: changing the previous window's tokens
    leaves the next window's NLL unchanged, while the memory model's changes."""
    model = build("llama", "kv")
    length = model.config.segment_length
    rows = torch.randint(1, 60, (2, 2 * length), generator=torch.Generator().manual_seed(1)).tolist()
    changed = [[(t % 50) + 2 for t in row[:length]] + row[length:] for row in rows]
    base = model.language_model
    assert segment_nll(base, rows, length, window=length)[0][1] == pytest.approx(
        segment_nll(base, changed, length, window=length)[0][1], rel=1e-6
    )
    assert segment_nll(model, rows, length)[0][1] != pytest.approx(segment_nll(model, changed, length)[0][1])


def test_segment_nll_rejects_rows_of_different_lengths():
    model = build("llama", "kv")
    with pytest.raises(ValueError, match="same length"):
        segment_nll(model, [[1, 2, 3], [1, 2]], 4)


def test_compare_perplexity_gains_and_spread():
    """Gains are per seed against the same seed of the reference, then averaged; the summary pools segments."""
    ln = math.log
    measurements = {
        "no_memory": {
            "label": "no memory",
            "description": "",
            "seeds": [0, 1],
            "counts": [10, 10, 10],
            "nll": [[10 * ln(100), 10 * ln(100), 10 * ln(100)], [10 * ln(80), 10 * ln(80), 10 * ln(80)]],
        },
        "memory": {
            "label": "memory",
            "description": "",
            "seeds": [0, 1],
            "counts": [10, 10, 10],
            "nll": [[10 * ln(100), 10 * ln(90), 10 * ln(90)], [10 * ln(80), 10 * ln(76), 10 * ln(72)]],
        },
    }
    results = compare_perplexity(
        measurements, segment_length=8, num_examples=5, reference="no_memory", beyond_segment=1
    )
    first, second = results["by_segment"][0], results["by_segment"][1]
    assert first["gain_percent"]["memory"] == pytest.approx(0.0)
    assert second["perplexity"]["memory"] == pytest.approx(83.0)
    assert second["spread"]["memory"] == pytest.approx([76.0, 90.0])
    assert second["gain_percent"]["memory"] == pytest.approx((10.0 + 5.0) / 2)
    beyond = results["beyond"]
    assert beyond["tokens"] == 20
    assert beyond["perplexity"]["memory"] == pytest.approx((90.0 + math.sqrt(76 * 72)) / 2)
    assert beyond["gain_spread"]["memory"][1] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="reference 'base'"):
        compare_perplexity(measurements, segment_length=8, num_examples=5, reference="base")


def test_window_collator_cuts_examples_into_windows():
    features = [
        {"input_ids": list(range(8)), "labels": list(range(8))},
        {"input_ids": list(range(8, 16)), "labels": list(range(8, 16))},
    ]
    batch = WindowCollator(4)(features)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert torch.equal(batch["labels"], batch["input_ids"])


# -- the recipe ----------------------------------------------------------------------------------------------
MINI = {
    "output_dir": None,
    "model.text_config": (
        '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, '
        '"num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}'
    ),
    "model.memory.segment_length": "16",
    "model.memory.memory_heads": "2",
    "data.num_segments": "4",
    "evaluation.num_segments": "[6]",
    "evaluation.num_examples": "4",
    "evaluation.batch_size": "4",
    "comparison.repeats": "2",
    "training.max_steps": "2",
    "training.per_device_train_batch_size": "2",
    "tokenizer.vocab_size": "300",
    "data.source": str(BOOKS / "train" / "pride_and_prejudice.txt"),  # one book: a faster tokenizer
}


def mini_overrides(out: Path, **changes) -> list[str]:
    settings = {**MINI, "output_dir": str(out), **changes}
    return [a for key, value in settings.items() for a in (f"--{key}", value)]


@pytest.fixture(scope="module")
def mini_job(tmp_path_factory) -> Path:
    """configs/lm_books_cpu.yaml in miniature: memory model, both baselines, two seeds, the report."""
    out = tmp_path_factory.mktemp("lm_books") / "run"
    assert main(["train", str(ROOT / "configs" / "lm_books_cpu.yaml"), *mini_overrides(out)]) == 0
    return out


def test_lm_job_trains_every_model_and_reports_them_side_by_side(mini_job):
    for name in (
        "memory/seed-1",
        "no_memory/seed-0",
        "no_memory/seed-1",
        "double_window/seed-0",
        "double_window/seed-1",
    ):
        assert (mini_job / "comparison" / name / "model.safetensors").is_file(), name
    baseline = json.loads((mini_job / "comparison" / "no_memory" / "seed-0" / "config.json").read_text())
    assert baseline["model_type"] == "llama"  # the base alone: no memory weights at all
    results = json.loads((mini_job / "eval" / "perplexity.json").read_text())
    assert results["reference"] == "no_memory"
    assert set(results["models"]) == {"memory", "no_memory", "double_window", "memory_disabled"}
    assert all(m["seeds"] == [0, 1] for m in results["models"].values())
    assert len(results["by_segment"]) == 6 and results["beyond"]["from_segment"] == 4
    assert results["data"]["source"] == "data/books/test"  # the test book, not the validation book
    card = (mini_job / "README.md").read_text()
    assert "Perplexity by segment position" in card and "gain:" in card  # the model card carries the table
    assert "| compared with | no_memory, double_window, trained the same way; seeds 0, 1 |" in card
    assert (mini_job / "eval" / "perplexity.png").stat().st_size > 0


def test_baseline_starts_from_the_memory_models_initial_base_weights(tmp_path):
    config = load_train_config(ROOT / "configs" / "lm_books_cpu.yaml", mini_overrides(tmp_path / "run"))
    memory_run = prepare_run(config)
    baseline = prepare_baseline(prepare_run(config), window=32)
    mine, theirs = memory_run.model.language_model.state_dict(), baseline.model.state_dict()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    assert baseline.data_collator.window == 32 and not (tmp_path / "run").exists()  # nothing written yet


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"evaluation.task": "passkey", "evaluation.source": "null"}, "set evaluation.task: perplexity"),
        ({"data.num_segments": "3"}, "use an even number of segments"),
        ({"evaluation.num_segments": "[4, 8]"}, "takes one example length"),
        ({"comparison.repeats": "0"}, "repeats must be at least 1"),
        ({"comparison.baselines": "[no_memory, no_memory]"}, "names a baseline twice"),
        ({"comparison.baselines": "[no_memory, base]"}, "score the pretrained base as shipped: set model.base"),
    ],
)
def test_bad_comparison_settings_fail_before_training(tmp_path, changes, message):
    config = load_train_config(ROOT / "configs" / "lm_books_cpu.yaml", mini_overrides(tmp_path / "run", **changes))
    with pytest.raises(ValueError, match=message):
        check_config(config)


def test_a_window_longer_than_the_positions_fails_clearly(tmp_path):
    text_config = MINI["model.text_config"].replace('"max_position_embeddings": 64', '"max_position_embeddings": 16')
    config = load_train_config(
        ROOT / "configs" / "lm_books_cpu.yaml", mini_overrides(tmp_path / "run", **{"model.text_config": text_config})
    )
    with pytest.raises(ValueError, match="max_position_embeddings >= 32"):
        prepare_baseline(prepare_run(config), window=32)


def test_the_bundled_books_are_there():
    assert sorted(p.name for p in (BOOKS / "train").glob("*.txt")) == ["pride_and_prejudice.txt", "tinyshakespeare.txt"]
    assert [p.name for p in (BOOKS / "held_out").glob("*.txt")] == ["moby_dick.txt"]
    assert [p.name for p in (BOOKS / "test").glob("*.txt")] == ["persuasion.txt"]
