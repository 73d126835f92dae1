"""scripts/reproduce.py: its arguments and its comparison of a job's figures with the README's, on fake finished
runs (the jobs themselves take about 50 minutes; the script is meant to run them, not the default suite)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reproduce():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import reproduce
    finally:
        sys.path.pop(0)
    return reproduce


def fake_passkey_run(out: Path, memory: dict[int, float], disabled: float = 0.0) -> None:
    buckets = [
        {
            "distance_segments": d,
            "metrics": {"memory": {"exact_match": m}, "memory_disabled": {"exact_match": disabled}},
        }
        for d, m in memory.items()
    ]
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "passkey.json").write_text(json.dumps({"by_distance_segments": buckets}))


def test_unknown_jobs_and_contradictory_folders_are_refused(reproduce, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.parse_args(["--jobs", "main", "passkey_2m"])
    assert exit_info.value.code == 2
    assert "unknown job(s) passkey_2m; choose among main, slot, lm_books, passkey_1m, recall_capacity, " in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--compare-only", str(tmp_path / "nowhere")])
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--compare-only", str(tmp_path), "--workdir", str(tmp_path)])
    assert "give one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--threads", "0"])
    assert "--threads must be at least 1" in capsys.readouterr().err
    assert reproduce.parse_args([]).jobs == [
        *("main", "slot", "lm_books", "passkey_1m", "recall_capacity", "smollm2_passkey", "smollm2_suite"),
        "smollm2_lm_books",
    ]


def test_figures_within_their_tolerance_pass_and_others_fail(reproduce, tmp_path, capsys):
    fake_passkey_run(tmp_path / "main", {1: 1.0, 8: 0.96, 16: 1.0})  # 0.96 is within 1.00 ± 0.05
    assert reproduce.main(["--compare-only", str(tmp_path), "--jobs", "main"]) == 0
    printed = capsys.readouterr().out
    assert "| main | exact match, key 8 segments back | 1.000 | ±0.050 | 0.960 | ok |" in printed
    assert "every figure within its tolerance (main)" in printed
    report = json.loads((tmp_path / "reproduce.json").read_text())
    assert report["all_ok"] and [row["verdict"] for row in report["rows"]] == ["ok", "ok", "ok"]
    assert "torch_threads" in report["environment"]

    fake_passkey_run(tmp_path / "passkey_1m", {256: 1.0, 1024: 1.0, 4096: 0.0, 16384: 0.98})
    assert reproduce.main(["--compare-only", str(tmp_path), "--jobs", "main", "passkey_1m", "slot"]) == 1
    printed = capsys.readouterr().out
    assert "| passkey_1m | exact match, key 256k tokens back | 1.000 | ±0.010 | 0.000 | OUTSIDE |" in printed
    assert "| passkey_1m | exact match, key 1M tokens back | 1.000 | ±0.010 | 0.980 | OUTSIDE |" in printed
    assert "| slot | exact match, key 16 segments back | 1.000 | ±0.080 | – | missing |" in printed  # never ran
    assert "some figures differ, are missing, or a job failed" in printed
    assert "Environment: torch" in (tmp_path / "reproduce.md").read_text()


def test_a_job_that_fails_fails_the_comparison(reproduce, tmp_path, monkeypatch, capsys):
    """A job whose command exits non-zero is reported as failed, even if an older report lies in its folder."""
    fake_passkey_run(tmp_path / "main", {8: 1.0, 16: 1.0})
    failing = reproduce.Job("main", ("{python}", "-c", "raise SystemExit(3)"), 1, reproduce.JOBS["main"].figures)
    monkeypatch.setitem(reproduce.JOBS, "main", failing)
    assert reproduce.main(["--workdir", str(tmp_path), "--jobs", "main"]) == 1
    printed = capsys.readouterr().out
    assert "main failed (exit status 3)" in printed
    assert json.loads((tmp_path / "reproduce.json").read_text())["timings"]["main"]["exit_status"] == 3


def test_the_real_model_jobs_read_their_chat_curve_and_perplexities(reproduce, tmp_path, capsys):
    """The real-model jobs' figures come from other reports: the chat curve's rows (by distance and needles) and
    the perplexity comparison (the memory model's percent below a baseline)."""
    passkey = reproduce.JOBS["smollm2_passkey"]
    expected = {(f.name): f.expected for f in passkey.figures}
    rows = [
        {"distance": d, "needles": needles, "memory": expected[name]}
        for (d, needles), name in zip(
            [(16384, 1), (65536, 1), (262144, 1), (1048576, 1), (65536, 4)], expected, strict=True
        )
    ]
    rows[4]["memory"] += 0.5  # the 4-needle row only: far outside
    (tmp_path / "smollm2_passkey" / "eval").mkdir(parents=True)
    (tmp_path / "smollm2_passkey" / "eval" / "chat_passkey.json").write_text(json.dumps({"rows": rows}))
    lm = reproduce.JOBS["smollm2_lm_books"]
    base, lora = (f.expected for f in lm.figures)
    perplexity = {
        "base": 50.0,
        "memory": 50.0 * (1 - base / 100),
        "no_memory": 50.0 * (1 - base / 100) / (1 - lora / 100),
    }
    (tmp_path / "smollm2_lm_books" / "eval").mkdir(parents=True)
    (tmp_path / "smollm2_lm_books" / "eval" / "perplexity.json").write_text(
        json.dumps({"beyond": {"perplexity": perplexity}})
    )
    assert "--comparison.repeats" in lm.command  # the README reports one seed
    assert reproduce.main(["--compare-only", str(tmp_path), "--jobs", "smollm2_passkey", "smollm2_lm_books"]) == 1
    verdicts = [row["verdict"] for row in json.loads((tmp_path / "reproduce.json").read_text())["rows"]]
    assert verdicts == ["ok", "ok", "ok", "ok", "OUTSIDE", "ok", "ok"]
    assert "| smollm2_passkey | exact match in chat, 64k back among 4 needles |" in capsys.readouterr().out


def test_the_suite_job_reads_its_figures_from_the_suite_report(reproduce, tmp_path, capsys):
    # the committed report of the suite config's run gives every expected figure; a lower score falls outside
    import shutil

    report = Path(__file__).resolve().parents[1] / "docs" / "results" / "smollm2_suite" / "read_loss" / "suite.json"
    (tmp_path / "smollm2_suite" / "eval").mkdir(parents=True)
    shutil.copy(report, tmp_path / "smollm2_suite" / "eval" / "suite.json")
    assert reproduce.main(["--compare-only", str(tmp_path), "--jobs", "smollm2_suite"]) == 0
    results = json.loads(report.read_text())
    for row in results["rows"]:
        if (row["task"], row["length"]) == ("niah_single_book", 16384):
            row["memory"] -= 40.0
    (tmp_path / "smollm2_suite" / "eval" / "suite.json").write_text(json.dumps(results))
    assert reproduce.main(["--compare-only", str(tmp_path), "--jobs", "smollm2_suite"]) == 1
    verdicts = [row["verdict"] for row in json.loads((tmp_path / "reproduce.json").read_text())["rows"]]
    assert verdicts == ["ok", "OUTSIDE", "ok"]
    capsys.readouterr()
