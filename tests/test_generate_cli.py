"""`hf-memlm generate`: prints the answer up to the end marker, reads documents with `memorize`, says what a
full memory forgot and how to keep it, takes memory settings at load time, and checks every input first."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import kind_settings_only
from transformers import AutoModelForCausalLM

import hf_memlm
from hf_memlm.cli import main
from hf_memlm.data import build_tokenizer, default_text
from hf_memlm.recipes.defaults import tiny_llama_config

PROMPT = " What is the pass key? The pass key is"


def _save(folder, memory_type: str, seed: int = 0):
    torch.manual_seed(seed)
    text_config = tiny_llama_config(vocab_size=260, hidden_size=32)
    text_config.initializer_range = 0.5  # large random weights: greedy decoding varies from token to token
    settings = dict(memory_layers=[0], segment_length=32, memory_heads=2, memory_size=256, memory_topk=8, num_slots=8)
    config = hf_memlm.MemLMConfig(
        text_config=text_config, **kind_settings_only(dict(settings, memory_type=memory_type))
    )
    model = hf_memlm.MemLMForCausalLM(config).eval()
    with torch.no_grad():  # non-zero memory output: what was read changes the answer
        for block in model.memory_blocks.values():
            block.output_projection.weight.normal_(std=0.3)
    model.save_pretrained(folder)
    build_tokenizer("byte").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("kv"), "kv")


@pytest.fixture(scope="module")
def slot_model(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("slot"), "slot")


def generate(*argv) -> int:
    return main(["generate", *map(str, argv)])


def test_generate_stops_at_the_saved_end_marker_and_prints_only_the_answer(kv_model, tmp_path, capsys):
    tokenizer = build_tokenizer("byte")
    model = AutoModelForCausalLM.from_pretrained(kv_model).eval()
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        free = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=256)
    greedy = free[0, prompt.shape[1] :].tolist()
    # the latest position whose token is new: with it as the end marker, generation stops right there
    stop = max(k for k in range(len(greedy)) if greedy[k] not in greedy[:k])
    assert stop >= 1, greedy

    with_marker = tmp_path / "with_marker"
    shutil.copytree(kv_model, with_marker)
    model.generation_config.eos_token_id = greedy[stop]
    model.generation_config.save_pretrained(with_marker)

    assert generate(with_marker, "--prompt", PROMPT) == 0  # default --max-new-tokens: only a ceiling
    captured = capsys.readouterr()
    assert captured.out == tokenizer.decode(greedy[:stop]) + "\n"
    assert "max-new-tokens" not in captured.err
    reloaded = AutoModelForCausalLM.from_pretrained(with_marker)
    with torch.no_grad():  # plain `generate` stops at the same marker (from the saved generation_config)
        stopped = reloaded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=256)
    assert stopped[0, prompt.shape[1] :].tolist() == greedy[: stop + 1]

    assert generate(kv_model, "--prompt", PROMPT, "--max-new-tokens", 8) == 0  # no marker saved: the ceiling
    captured = capsys.readouterr()
    assert captured.out == tokenizer.decode(greedy, skip_special_tokens=True) + "\n"
    assert "stopped at --max-new-tokens=8 before any end marker" in captured.err


def test_generate_read_says_what_a_full_memory_forgot_and_how_to_keep_it(kv_model, tmp_path, capsys):
    document = tmp_path / "doc.txt"
    document.write_text(default_text()[:300])  # 300 byte tokens: 299 entries (value shift 1)
    memory_file = tmp_path / "memory.safetensors"
    argv = ["--prompt", PROMPT, "--max-new-tokens", 4, "--read", document, "--save-memory", memory_file]
    assert generate(kv_model, *argv, "--memory-size", 100) == 0
    err = capsys.readouterr().err
    assert "the memory keeps memory_size=100 entries (one per token) and 299 were needed" in err
    assert f"the first 199 tokens (66%) of '{document}' are no longer in memory" in err
    assert "pass --memory-size 1024 (in Python: AutoModelForCausalLM.from_pretrained(folder, memory_size=1024))" in err
    assert int(hf_memlm.MemoryState.load(memory_file).num_entries()[0]) == 100  # the setting took effect

    assert generate(kv_model, *argv) == 0  # the saved memory_size=256 is too small too
    assert "the first 43 tokens (14%)" in capsys.readouterr().err
    assert generate(kv_model, *argv, "--memory-size", 1024) == 0  # replaces the memory file saved above
    assert "no longer in memory" not in capsys.readouterr().err
    assert int(hf_memlm.MemoryState.load(memory_file).num_entries()[0]) == 299


def test_generate_read_uses_memorize_and_answers_like_a_forward(kv_model, tmp_path, capsys):
    """`--read` then the prompt gives what greedy decoding of the document followed by the prompt gives, when the
    document fills whole segments (the prompt then starts a segment in both)."""
    tokenizer = build_tokenizer("byte")
    document = tmp_path / "doc.txt"
    document.write_text(default_text()[:128])  # 4 segments of 32
    assert generate(kv_model, "--read", document, "--prompt", PROMPT, "--max-new-tokens", 6) == 0
    printed = capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(kv_model).eval()
    ids = tokenizer(default_text()[:128] + PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        whole = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=256)
    assert printed == tokenizer.decode(whole[0, ids.shape[1] :], skip_special_tokens=True) + "\n"


def test_generate_checks_every_input_before_the_work(kv_model, slot_model, tmp_path, capsys):
    document = tmp_path / "doc.txt"
    document.write_text("It is a truth universally acknowledged.")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(kv_model, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert generate(no_weights, "--prompt", PROMPT) == 2
    assert f"'{no_weights}' has a config.json but no weights" in capsys.readouterr().err

    weights = kv_model / "model.safetensors"
    before = weights.read_bytes()
    assert generate(kv_model, "--prompt", PROMPT, "--read", document, "--save-memory", weights) == 2
    err = capsys.readouterr().err
    assert f"--save-memory: refusing to overwrite {weights}: it exists and is not a MemoryState file" in err
    assert "Reading into memory" not in err and weights.read_bytes() == before

    assert generate(kv_model, "--prompt", PROMPT, "--memory", weights) == 2
    assert f"--memory file '{weights}' is not a saved memory" in capsys.readouterr().err
    assert generate(kv_model, "--prompt", "", "--read", document) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    assert generate(kv_model, "--prompt", PROMPT, "--read", document, "--save-memory", tmp_path) == 2
    assert f"--save-memory: cannot save memory to '{tmp_path}': it is a folder" in capsys.readouterr().err
    assert generate(kv_model, "--prompt", PROMPT, "--read", document, "--save-memory", tmp_path / "no" / "m") == 2
    assert "does not exist" in capsys.readouterr().err

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Élisabeth Bennet".encode("latin-1"))
    assert generate(kv_model, "--prompt", PROMPT, "--read", latin1) == 2
    err = capsys.readouterr().err
    assert f"--read file '{latin1}' is not UTF-8 text (byte 0xc9 at offset 0)" in err
    assert "Reading into memory" not in err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert generate(kv_model, "--prompt", PROMPT, "--read", empty) == 2
    assert f"--read file '{empty}' is empty" in capsys.readouterr().err
    assert generate(kv_model, "--prompt", PROMPT, "--read", tmp_path / "missing.txt") == 2
    assert f"--read file '{tmp_path / 'missing.txt'}' does not exist" in capsys.readouterr().err

    assert generate(slot_model, "--prompt", PROMPT, "--memory-size", 4096) == 2
    err = capsys.readouterr().err
    assert f"--memory-size (kv memory settings) cannot be used here: '{slot_model}' holds 'slot' memory" in err
    assert generate(kv_model, "--prompt", PROMPT, "--memory-size", 4) == 2
    assert "memory_topk=8 is larger than memory_size=4: top-k cannot read more entries" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate(kv_model, "--prompt", PROMPT, "--memory-topk", "many")
    assert "expected a positive integer or 'none', got 'many'" in capsys.readouterr().err


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_asks_through_the_chat_template_after_reading(tmp_path, capsys):
    """--chat MESSAGE: the message goes through the tokenizer's chat template in a fresh call after --read, and
    gives what `generate` gives on those ids with the document's memory; a tokenizer without a template is refused."""
    folder = _save(tmp_path / "model", "kv")
    tokenizer = build_tokenizer("byte")
    document = tmp_path / "doc.txt"
    document.write_text(default_text()[:300] + " The pass key is 48213. Remember it. " + default_text()[300:500])
    assert generate(folder, "--read", document, "--chat", "What is the pass key?", "--max-new-tokens", 6) == 2
    assert "chat template" in capsys.readouterr().err
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    assert generate(folder, "--read", document, "--chat", "What is the pass key?", "--max-new-tokens", 6) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    state = model.memorize(tokenizer(document.read_text(), return_tensors="pt")["input_ids"])
    prompt = tokenizer("<user>What is the pass key?</user><assistant>", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**prompt, memory_state=state, max_new_tokens=6, do_sample=False)
    expected = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert printed == expected and printed
    assert generate(folder, "--chat", "   ") == 2
    assert "--chat is empty" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_named(kv_model, capsys):
    """`--prompt "$(printf 'caf\\xe9')"`: the shell hands Python the byte as a lone surrogate (a TypeError before)."""
    assert generate(kv_model, "--prompt", "caf\udce9") == 2
    assert "--prompt is not UTF-8 text (byte 0xe9 at offset 3); convert it first" in capsys.readouterr().err


def test_read_takes_standard_input(kv_model, monkeypatch, capsys):
    import io
    import sys

    document = default_text()[:128]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert generate(kv_model, "--read", "-", "--prompt", PROMPT, "--max-new-tokens", 4) == 2
    assert "--read file '<standard input>' is empty" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(document.encode())))
    assert generate(kv_model, "--read", "-", "--prompt", PROMPT, "--max-new-tokens", 4) == 0
    from_stdin = capsys.readouterr().out
    with open(kv_model.parent / "doc.txt", "w") as handle:
        handle.write(document)
    assert generate(kv_model, "--read", kv_model.parent / "doc.txt", "--prompt", PROMPT, "--max-new-tokens", 4) == 0
    assert capsys.readouterr().out == from_stdin


def test_read_from_a_pipe_is_not_called_a_folder(kv_model, tmp_path, capsys):
    import os
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text(default_text()[:64]), daemon=True)
    writer.start()
    status = generate(kv_model, "--read", pipe, "--prompt", PROMPT, "--max-new-tokens", 2)
    if writer.is_alive():  # the pipe was never opened: release the writer
        os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))
    writer.join(5)
    assert "is a folder" not in capsys.readouterr().err
    assert status == 0


def test_a_device_that_is_not_there_is_named(kv_model, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert generate(kv_model, "--prompt", PROMPT, "--device", "cuda") == 2
    assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert generate(kv_model, "--prompt", PROMPT, "--device", "gpu") == 2
    assert "--device 'gpu' is not a device; use cpu, cuda" in capsys.readouterr().err


def test_a_memory_file_of_another_model_is_warned_about(kv_model, tmp_path, capsys):
    other = _save(tmp_path / "other", "kv", seed=1)
    document = tmp_path / "doc.txt"
    document.write_text(default_text()[:100])
    memory = tmp_path / "memory.safetensors"
    argv = ["--prompt", PROMPT, "--max-new-tokens", 2]
    assert generate(kv_model, *argv, "--read", document, "--save-memory", memory) == 0
    assert generate(kv_model, *argv, "--memory", memory) == 0
    assert "warning" not in capsys.readouterr().err
    assert generate(other, *argv, "--memory", memory) == 0
    err = capsys.readouterr().err
    assert f"warning: --memory '{memory}': memory file {memory} was written by a model with other weights" in err
