"""`hf-memlm train` and `hf-memlm generate`: YAML + overrides, clear errors that leave nothing behind,
training that saves a reloadable model, resuming, generation with a document read into memory, and the
shipped configs (including the pretrained-model config, built with a local stand-in for the download)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import hf_memlm
from hf_memlm.cli import main
from hf_memlm.data import default_text
from hf_memlm.recipes.config import load_train_config
from hf_memlm.recipes.train import prepare_run

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")
# a few quick steps of the tiny config, no evaluation, no checkpoints
QUICK = [
    "--training.max_steps",
    "4",
    "--training.logging_steps",
    "1",
    "--training.save_strategy",
    "no",
    "--training.eval_strategy",
    "no",
    "--data.eval_fraction",
    "0",
    "--training.disable_tqdm",
    "true",
]


def train(tmp_path, *overrides, name="out") -> tuple[int, Path]:
    output_dir = tmp_path / name
    return main(["train", TINY, *QUICK, "--output_dir", str(output_dir), *overrides]), output_dir


# -- config loading --------------------------------------------------------------------------------------
def test_overrides_are_parsed_as_yaml_with_numbers_and_plain_words():
    config = load_train_config(
        TINY,
        [
            "--training.learning_rate",
            "2e-4",
            "--training.eval_strategy=no",
            "--model.memory.memory_type",
            "slot",
            "--model.memory.memory_layers",
            "[0, 1]",
            "--model.text_config.hidden_size",
            "32",
            "--output_dir",
            "runs/a:b",
        ],
    )
    assert config["training"]["learning_rate"] == 2e-4
    assert config["training"]["memory_learning_rate"] == 1e-2  # from the YAML file (written 1.0e-2)
    assert config["training"]["eval_strategy"] == "no"  # not YAML 1.1's False
    assert config["model"]["memory"]["memory_type"] == "slot"
    assert config["model"]["memory"]["memory_layers"] == [0, 1]
    assert config["model"]["text_config"]["hidden_size"] == 32  # a number, merged into the YAML mapping
    assert config["model"]["text_config"]["num_hidden_layers"] == 2
    assert config["output_dir"] == "runs/a:b"
    assert config["data"]["num_examples"] == 256  # schema default
    assert config["lora"] == {}  # only values that differ from LoraConfig's defaults


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--training.learning_rat", "1e-3"],
            "unknown config key 'training.learning_rat' (in section 'training'). Did you mean 'training.learning_rate'",
        ),
        (
            ["--learning_rate", "1e-3"],
            "unknown config key 'learning_rate' (at the top level). Did you mean 'training.learning_rate'?",
        ),
        (["--model.memory.memory_typ", "kv"], "Did you mean 'model.memory.memory_type'"),
        (["--training.learning_rate", "fast"], "training.learning_rate='fast' is not valid: expected a number"),
        (["--training.learning_rate", "-1e-3"], "learning_rate=-0.001 must be a finite number >= 0"),
        (["--training.memory_learning_rate", "-5"], "memory_learning_rate=-5.0 must be a finite number >= 0"),
        (
            ["--training.memory_learning_rate", "fast"],
            "memory_learning_rate='fast' is not valid: expected a number or null",
        ),
        (["--data.num_segments", "2.5"], "data.num_segments='2.5' is not valid: expected an integer"),
        (
            ["--model.trainable", "partial"],
            "model.trainable='partial' is not valid: expected one of full, memory_only, memory_new, lora",
        ),
        (["--training.output_dir", "x"], "training.output_dir cannot be set here: set the top-level output_dir."),
        (["--training.max_steps"], "--training.max_steps needs a value"),
        (["--model.memory.memory_type", "lstm"], "model.memory: MemLMConfig: memory_type='lstm' is unknown"),
        (["--model.memory.segment_length", "0"], "model.memory: MemLMConfig: segment_length=0 must be a positive"),
        (
            ["--model.text_config.hiden_size", "32"],
            "model.text_config.hiden_size: LlamaConfig has no such field. Did you mean 'hidden_size'",
        ),
        (
            ["--model.text_config.vocab_size", "100"],
            "tokenizer has 260 tokens (ids 0..259) but the model's vocab_size is 100",
        ),
    ],
)
def test_bad_config_is_rejected_with_a_clear_message_and_nothing_written(tmp_path, capsys, overrides, message):
    code, output_dir = train(tmp_path, *overrides)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not output_dir.exists()


def test_unknown_key_in_the_yaml_file_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(Path(TINY).read_text() + "\nmodle:\n  base: null\n")
    assert main(["train", str(config), "--output_dir", str(tmp_path / "out")]) == 2
    assert "unknown config key 'modle' (at the top level). Did you mean 'model'?" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("problem", ["missing file", "empty corpus", "short documents", "output folder in use"])
def test_bad_input_gives_a_clear_error_and_leaves_nothing_half_written(tmp_path, capsys, problem):
    corpus = tmp_path / "corpus.txt"
    output_dir = tmp_path / "out"
    if problem == "empty corpus":
        corpus.write_text("")
        message = "is empty: it holds no non-empty text"
    elif problem == "short documents":
        text = "A document far shorter than one example of 4 segments of 64 tokens."
        corpus.write_text(text)
        message = (
            f"all 1 documents are too short: the longest has {len(text)} tokens, but one example needs "
            "num_segments * segment_length = 4 * 64"
        )
    elif problem == "output folder in use":
        corpus.write_text(default_text())
        output_dir.mkdir()
        (output_dir / "notes.txt").write_text("earlier results")
        message = "already holds files; choose a new folder"
    else:
        message = f"the corpus file {corpus} does not exist"
    code = main(["train", TINY, *QUICK, "--data.source", str(corpus), "--output_dir", str(output_dir)])
    assert code == 2
    assert message in capsys.readouterr().err
    if problem == "output folder in use":
        assert [p.name for p in output_dir.iterdir()] == ["notes.txt"]
    else:
        assert not output_dir.exists()


def test_dry_run_prints_the_resolved_config(tmp_path, capsys):
    assert main(["train", TINY, "--dry-run", "--training.max_steps", "7", "--output_dir", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 7" in printed and "memory_type: kv" in printed
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.memory.segment_length", "1024"], "segment_length=1024 exceeds the base model's"),
        (["--model.memory.memory_layers", "[5]"], "memory layer 5 is out of range"),
        (["--training.learning_rate", "-1"], "learning_rate=-1.0 must be a finite number >= 0"),
        (["--evaluation.task", "passkey", "--evaluation.num_segments", "[]"], "evaluation.num_segments must be"),
    ],
)
def test_dry_run_builds_the_model_config_and_training_arguments(tmp_path, capsys, overrides, message):
    assert main(["train", TINY, "--dry-run", *overrides, "--output_dir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- training, saving, generating ------------------------------------------------------------------------
def test_train_saves_a_reloadable_model_and_generate_reads_a_document(tmp_path, capsys):
    code, output_dir = train(tmp_path)
    assert code == 0
    printed = capsys.readouterr().out
    assert "== training finished ==" in printed and "final loss" in printed
    assert f"model + tokenizer saved to {output_dir}" in printed
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["log_history"]) == 4
    environment = summary["environment"]  # what a rerun must match to learn the same weights
    assert (environment["torch"], environment["transformers"]) == (torch.__version__, transformers.__version__)
    assert environment["torch_threads"] == torch.get_num_threads()
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    model = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    assert isinstance(model, hf_memlm.MemLMForCausalLM) and len(tokenizer) == 260
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id  # special tokens follow the tokenizer

    document = tmp_path / "doc.txt"
    document.write_text(default_text()[:1000])
    memory_file = tmp_path / "memory.safetensors"
    prompt = ["--prompt", "Mr. Bennet said", "--max-new-tokens", "12"]
    assert main(["generate", str(output_dir), *prompt, "--read", str(document), "--save-memory", str(memory_file)]) == 0
    after_reading = capsys.readouterr().out
    assert memory_file.is_file()
    assert main(["generate", str(output_dir), *prompt, "--memory", str(memory_file)]) == 0
    from_saved_memory = capsys.readouterr().out
    assert after_reading == from_saved_memory  # the saved memory is what reading the document produced

    # the same through the Python API: read the document, then generate greedily from the prompt
    from hf_memlm.cli.generate import read_into_memory

    state = read_into_memory(model, tokenizer, document.read_text())
    # one byte token per character; kv memory pairs each key with the next token's value, so the last
    # token's entry waits for a successor
    assert int(state.num_entries()[0]) == 1000 - 1
    prompt_ids = tokenizer("Mr. Bennet said", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        output = model.generate(
            prompt_ids, memory_state=state, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert tokenizer.decode(output[0, prompt_ids.shape[1] :], skip_special_tokens=True) + "\n" == after_reading


@pytest.mark.parametrize("trainable", ["memory_only", "lora"])
def test_freezing_modes_train_and_save_through_the_cli(tmp_path, capsys, trainable):
    code, output_dir = train(tmp_path, "--training.max_steps", "2", "--model.trainable", trainable)
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((output_dir / "train_summary.json").read_text())
    counts = summary["parameters"]
    if trainable == "memory_only":
        assert counts["trainable"] == counts["trainable_memory"] < counts["total"]
    else:  # LoRA adapters + memory blocks; the adapter folder and the merged model are both saved
        assert counts["trainable_memory"] < counts["trainable"] < counts["total"]
        assert f"LoRA adapter + memory weights saved to {output_dir / 'adapter'}" in printed
        assert (output_dir / "adapter" / "adapter_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert isinstance(model, hf_memlm.MemLMForCausalLM)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_generate_errors_are_clear(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "model folder" in capsys.readouterr().err
    tmp_path.joinpath("model").mkdir()
    assert main(["generate", str(tmp_path / "model"), "--prompt", "hi", "--read", str(tmp_path / "missing.txt")]) == 2
    assert f"'{tmp_path / 'model'}' has no config.json" in capsys.readouterr().err  # tests/test_generate_cli.py: more


def test_resume_from_a_checkpoint_continues_with_the_same_losses(tmp_path, capsys):
    steps = [
        "--training.max_steps",
        "6",
        "--training.save_strategy",
        "steps",
        "--training.save_steps",
        "3",
        "--training.lr_scheduler_type",
        "linear",
        "--training.warmup_steps",
        "0",
    ]
    code, uninterrupted = train(tmp_path, *steps, name="full")
    assert code == 0
    # an interrupted run: its first checkpoint exists, and the second was killed mid-save (no trainer state)
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(uninterrupted / "checkpoint-3", interrupted / "checkpoint-3")
    shutil.copytree(uninterrupted / "checkpoint-6", interrupted / "checkpoint-6")
    (interrupted / "checkpoint-6" / "trainer_state.json").unlink()
    code = main(
        ["train", TINY, *QUICK, *steps, "--output_dir", str(interrupted), "--training.resume_from_checkpoint", "last"]
    )
    assert code == 0
    assert "resumed from" in capsys.readouterr().out
    full = json.loads((uninterrupted / "train_summary.json").read_text())["log_history"]
    resumed = json.loads((interrupted / "train_summary.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-3")
    full_losses = {entry["step"]: entry["loss"] for entry in full}
    resumed_losses = {entry["step"]: entry["loss"] for entry in resumed["log_history"]}
    assert sorted(resumed_losses) == sorted(full_losses) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):  # the steps trained after resuming
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    code, _ = train(tmp_path, "--training.resume_from_checkpoint", "last")
    assert code == 2
    assert "holds no complete checkpoint-* folder" in capsys.readouterr().err


def test_overwrite_output_dir_removes_the_earlier_runs_checkpoints(tmp_path, capsys):
    """Otherwise a later `resume_from_checkpoint: last` would resume the earlier run, losing the new one."""
    steps = ["--training.save_strategy", "steps", "--training.save_steps", "2"]
    code, output_dir = train(tmp_path, *steps, "--training.max_steps", "6")
    assert code == 0 and (output_dir / "checkpoint-6").is_dir()
    (output_dir / "notes.txt").write_text("kept")
    code, _ = train(tmp_path, *steps, "--training.max_steps", "4", "--overwrite_output_dir", "true")
    assert code == 0
    assert (
        "removing the earlier run's checkpoints (checkpoint-6, checkpoint-4, checkpoint-2)" in capsys.readouterr().out
    )
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["max_steps"] == 4  # the new run's checkpoint, not the old one's
    assert (output_dir / "notes.txt").read_text() == "kept"


# -- shipped configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_resolves(name):
    config = load_train_config(ROOT / "configs" / name)
    assert config["output_dir"].startswith("outputs/")


def test_no_shipped_config_scores_on_what_it_trains_on_and_the_book_roles_share_no_text():
    # data/books: train/, held_out/ (the validation book recipes were chosen on), test/ (the README's figures)
    books = {role: {p.name: p.read_bytes() for p in (ROOT / "data" / "books" / role).glob("*.txt")} for role in
             ("train", "held_out", "test")}  # fmt: skip
    assert all(books.values())
    texts = [text for files in books.values() for text in files.values()]
    assert len(set(texts)) == len(texts)  # no book in two roles
    scored_books = [ROOT / "data" / "books" / role for role in ("held_out", "test")]
    for path in (ROOT / "configs").glob("*.yaml"):
        config = load_train_config(path)
        trained, scored = config["data"].get("source"), config["evaluation"].get("source")
        assert scored is None or scored != trained, path.name
        if trained and (ROOT / trained).exists():  # a folder source is read recursively: none may hold a scored book
            assert not any(book.is_relative_to(ROOT / trained) for book in scored_books), path.name
    # the jobs whose recipes were searched on the validation book report on the test book, real-model ones included
    for name in ("lm_books_cpu.yaml", "passkey_1m_cpu.yaml", "smollm2_passkey_cpu.yaml", "smollm2_lm_books_cpu.yaml"):
        assert load_train_config(ROOT / "configs" / name)["evaluation"]["source"] == "data/books/test", name


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml")))
def test_every_accelerate_config_loads(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / name))
    assert config.num_processes >= 2 and config.num_machines == 1


def test_pretrained_base_config_builds_everything_but_the_download(tmp_path):
    """configs/smollm2_lora_memory.yaml with model.base pointing at a local stand-in that has SmolLM2-135M's
    layout (30 layers, 9 heads, 3 key/value heads) at a tiny width, and its own tokenizer: everything the
    config asks for is built and checked, without network and without writing the output folder."""
    from hf_memlm.data import build_tokenizer

    stand_in = tmp_path / "smollm2-stand-in"
    torch.manual_seed(0)
    tokenizer = build_tokenizer("byte")
    base_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=36,
        intermediate_size=48,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    AutoModelForCausalLM.from_config(base_config).save_pretrained(stand_in)
    tokenizer.save_pretrained(stand_in)
    books = tmp_path / "books"
    books.mkdir()
    (books / "pride.txt").write_text(default_text())

    config = load_train_config(
        ROOT / "configs" / "smollm2_lora_memory.yaml",
        ["--model.base", str(stand_in), "--data.source", str(books), "--output_dir", str(tmp_path / "out")],
    )
    prepared = prepare_run(config)
    from peft import PeftModel

    model = prepared.model
    assert isinstance(model, PeftModel)
    memlm = model.get_base_model()
    assert memlm.config.memory_layers == [20] and memlm.config.segment_length == 512
    assert type(memlm.memory_blocks["20"]).__name__ == "ModulesToSaveWrapper"
    lora_layers = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert lora_layers == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(prepared.train_dataset[0]["input_ids"]) == 8 * 512
    args = prepared.training_args
    assert args.bf16 and args.activation_checkpointing and args.memory_learning_rate == 1e-3
    assert args.gradient_accumulation_steps == 8
    assert not (tmp_path / "out").exists()


def test_passkey_evaluation_takes_its_filler_from_held_out_text(tmp_path, capsys, monkeypatch):
    from hf_memlm import data

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 40)
    fillers = []
    make_passkey = data.TASK_BUILDERS["passkey"]

    def recording(*args, **kwargs):
        fillers.append(kwargs.get("text"))
        return make_passkey(*args, **kwargs)

    monkeypatch.setitem(data.TASK_BUILDERS, "passkey", recording)
    evaluation = ["--evaluation.task", "passkey", "--evaluation.num_segments", "[2]", "--evaluation.num_examples", "2"]
    evaluation += ["--evaluation.check_generate", "0", "--evaluation.options", "{needle_segment: 0}"]
    passkey_data = ["--data.task", "passkey", "--data.num_segments", "2", "--data.num_examples", "32"]
    code, output_dir = train(tmp_path, *passkey_data, *evaluation, "--evaluation.source", str(held_out))
    assert code == 0, capsys.readouterr().err
    assert fillers[0] is None and fillers[-1] == held_out.read_text()  # training filler: the bundled book
    report = json.loads((output_dir / "eval" / "passkey.json").read_text())
    assert report["data"]["filler_source"] == str(held_out) and "text" not in report["data"]["task_options"]

    # a source that is not there fails before training, and nothing is written
    code, missing_run = train(tmp_path, *passkey_data, *evaluation, "--evaluation.source", "nowhere.txt", name="x")
    assert code == 2 and "evaluation.source" in capsys.readouterr().err and not missing_run.exists()
