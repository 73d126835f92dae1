"""Hostile and careless command-line input (issue 23): every case ends in one clear line naming the flag or
file, and nothing the command did not create is overwritten."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import build

from hf_memlm.cli import main
from hf_memlm.data import default_text

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


# -- train -------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
QUICK = ["--training.max_steps", "2", "--training.eval_strategy", "no", "--data.eval_fraction", "0"]
QUICK += ["--training.logging_steps", "1", "--training.disable_tqdm", "true"]


def test_train_config_that_is_a_folder_or_not_utf8_is_named(tmp_path, capsys):
    assert main(["train", str(tmp_path), "--dry-run"]) == 2
    assert f"config file '{tmp_path}' is a folder; pass a YAML file" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("seed: 1  # café\n".encode("latin-1"))
    assert main(["train", str(latin1), "--dry-run"]) == 2
    assert f"config file '{latin1}' is not UTF-8 text (byte 0xe9 at offset 14)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value", ["{class_path: hf_memlm_probe_module.Config}", "hf_memlm_probe_module.Config"], ids=["mapping", "name"]
)
def test_train_config_never_imports_a_module_it_names(tmp_path, monkeypatch, capsys, value):
    (tmp_path / "hf_memlm_probe_module.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('imported').write_text('x')\nclass Config:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", TINY, "--lora.loftq_config", value, "--dry-run"]) == 2
    assert "is not accepted" in capsys.readouterr().err
    assert not (tmp_path / "imported").exists()
    assert main(["train", TINY, "--lora.loftq_config", "{loftq_bits: 4}", "--dry-run"]) == 0  # plain settings


@pytest.mark.parametrize("problem", ["output_dir is a file", "output_dir unwritable", "missing source", "t5 base"])
def test_dry_run_refuses_what_the_real_run_refuses(tmp_path, capsys, problem):
    output_dir = tmp_path / "out"
    flags = []
    if problem == "output_dir is a file":
        output_dir.write_text("notes")
        message = f"output_dir '{output_dir}' is a file"
    elif problem == "output_dir unwritable":
        output_dir = Path("/proc/hf_memlm_out")  # no one, root included, may create files there
        message = "output_dir '/proc/hf_memlm_out' cannot be written: '/proc' does not accept new files"
    elif problem == "missing source":
        flags = ["--data.source", str(tmp_path / "missing.txt")]
        message = f"data.source: the corpus file {tmp_path / 'missing.txt'} does not exist"
    else:
        flags = ["--model.text_config", "{model_type: t5, d_model: 32, num_layers: 2, num_heads: 2}"]
        message = "model.memory: MemLMConfig: the base 't5' is an encoder-decoder model, not a causal LM"
    for dry_run in (["--dry-run"], []):
        assert main(["train", TINY, *QUICK, *flags, "--output_dir", str(output_dir), *dry_run]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("task", ["text", "chat_passkey"])
def test_a_relative_source_missing_from_the_working_folder_fails_before_weights_load(
    tmp_path, monkeypatch, capsys, task
):
    # "data/books/train" run from outside the repository: not a Hub id (name or owner/name), so a missing path,
    # for every task, said with the folder it was looked for in, before a model is built.
    monkeypatch.chdir(tmp_path)
    built = []
    monkeypatch.setattr("hf_memlm.recipes.pipeline.prepare_run", lambda *a, **k: built.append(1) or 1 / 0)
    flags = ["--data.task", task, "--data.source", "data/books/train", "--output_dir", str(tmp_path / "out")]
    for dry_run in (["--dry-run"], []):
        assert main(["train", str(Path(TINY).resolve()), *QUICK, *flags, *dry_run]) == 2
        err = capsys.readouterr().err
        assert "data.source: the corpus file data/books/train does not exist" in err
        assert f"from the working folder {tmp_path}" in err
    assert not built and not (tmp_path / "out").exists()


def test_train_corpus_that_is_not_utf8_names_the_file_and_byte(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(default_text())
    (corpus / "b.txt").write_bytes(("x" * 70_000 + "café").encode("latin-1"))
    assert main(["train", TINY, *QUICK, "--data.source", str(corpus), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"data.source: load_text_corpus: {corpus / 'b.txt'} is not UTF-8 text (byte 0xe9 at offset 70003)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("run") / "out"
    flags = ["--training.save_strategy", "steps", "--training.save_steps", "2"]
    assert main(["train", TINY, *QUICK, *flags, "--output_dir", str(output_dir)]) == 0
    return output_dir


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--model.memory.memory_type", "slot"],
            "was trained with other model settings (model.memory.memory_type: 'kv' in the checkpoint, 'slot' now)",
        ),
        (["--model.text_config.hidden_size", "32"], "base hidden_size: 64 in the checkpoint, 32 now"),
        (["--model.trainable", "memory_only"], "model.trainable: 'full' in the checkpoint, 'memory_only' now"),
    ],
)
def test_resume_with_other_model_settings_names_what_differs(checkpointed_run, capsys, flags, message):
    argv = ["train", TINY, *QUICK, "--output_dir", str(checkpointed_run), "--training.resume_from_checkpoint", "last"]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Resume with the settings of that run" in err
    assert len(err.splitlines()) == 1


def test_resume_from_a_saved_model_folder_says_it_is_no_checkpoint(checkpointed_run, tmp_path, capsys):
    argv = ["train", TINY, *QUICK, "--output_dir", str(tmp_path / "new")]
    assert main([*argv, "--training.resume_from_checkpoint", str(checkpointed_run)]) == 2
    err = capsys.readouterr().err
    assert f"training.resume_from_checkpoint: '{checkpointed_run}' is not a Trainer checkpoint" in err


# -- eval --------------------------------------------------------------------------------------------------
def test_eval_perplexity_data_that_is_not_utf8_names_the_file(checkpointed_run, tmp_path, capsys):
    latin1 = tmp_path / "book.txt"
    latin1.write_bytes("Élisabeth".encode("latin-1"))
    argv = ["eval", str(checkpointed_run), "--task", "perplexity", "--output-dir", str(tmp_path / "r")]
    assert main([*argv, "--data", str(latin1), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{latin1} is not UTF-8 text (byte 0xc9 at offset 0)" in err and len(err.splitlines()) == 1


def test_eval_never_replaces_the_report_training_wrote(checkpointed_run, tmp_path, capsys):
    import shutil

    trained = tmp_path / "trained"
    shutil.copytree(checkpointed_run, trained, ignore=shutil.ignore_patterns("checkpoint-*"))
    (trained / "eval").mkdir(exist_ok=True)
    (trained / "eval" / "passkey.json").write_text("{}")
    argv = ["eval", str(trained), "--task", "passkey", "--num-examples", "1", "--no-progress"]
    assert main([*argv, "--output-dir", str(trained / "eval")]) == 2
    err = capsys.readouterr().err
    assert f"--output-dir '{trained / 'eval'}' is the evaluation folder of the trained model in '{trained}'" in err
    assert (trained / "eval" / "passkey.json").read_text() == "{}"


def test_eval_device_that_is_not_there_is_named(checkpointed_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["eval", str(checkpointed_run), "--task", "passkey", "--output-dir", str(tmp_path / "r")]
    assert main([*argv, "--device", "cuda"]) == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err


def test_eval_output_dir_that_cannot_be_written_is_named_before_the_work(checkpointed_run, capsys):
    argv = ["eval", str(checkpointed_run), "--task", "passkey", "--num-examples", "1", "--no-progress"]
    assert main([*argv, "--output-dir", "/proc/hf_memlm_reports"]) == 2
    err = capsys.readouterr().err
    assert "--output-dir '/proc/hf_memlm_reports' cannot be written: '/proc' does not accept new files" in err
