"""Hostile and careless command-line input (issue 23): every case ends in one clear line naming the flag or
file, and nothing the command did not create is overwritten."""

from __future__ import annotations

import hashlib

from conftest import build

from hf_memlm.cli import main

DEMO = ["--tokens", "256", "--segment-length", "32"]


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_demo_never_overwrites_a_model_it_did_not_write(tmp_path, capsys):
    trained = tmp_path / "trained"
    build("llama", "kv").save_pretrained(trained)
    before = _digest(trained)
    assert main(["demo", "--output-dir", str(trained), *DEMO]) == 2
    err = capsys.readouterr().err
    assert f"hf-memlm demo: error: --output-dir '{trained}' already holds files that hf-memlm demo did not write" in err
    assert "config.json" in err and "Choose a new or empty folder" in err
    assert _digest(trained) == before

    (tmp_path / "a_file").write_text("x")
    assert main(["demo", "--output-dir", str(tmp_path / "a_file"), *DEMO]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_demo_may_replace_its_own_earlier_output(tmp_path, capsys):
    folder = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(folder), *DEMO]) == 0
    assert main(["demo", "--output-dir", str(folder), *DEMO, "--memory-type", "slot"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")
