"""Saved in Hub format: reloads with AutoModelForCausalLM, with hf_memlm installed or through remote code."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from conftest import BASES, KINDS, SEGMENT, base_config, build, kind_settings_only, run_python_json
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from hf_memlm import MemLMConfig, MemLMForCausalLM, MemoryState


def _ids(batch=2, length=3 * SEGMENT):
    return torch.randint(3, 90, (batch, length), generator=torch.Generator().manual_seed(3))


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs after reload"


def test_save_and_auto_reload(arch_kind, tmp_path):
    model = build(*arch_kind)
    assert any(p.abs().sum() > 0 for p in model.memory_blocks.parameters())
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "modeling_memlm.py", "configuration_memlm.py"} <= files
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_memlm.MemLMConfig",
        "AutoModelForCausalLM": "modeling_memlm.MemLMForCausalLM",
    }
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("memory_blocks.0.") for k in saved)

    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(reloaded, MemLMForCausalLM)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    _assert_same_weights(model, reloaded)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(_ids()).logits, model(_ids()).logits)


def test_config_json_round_trip(arch_kind, tmp_path):
    model_type, kind = arch_kind
    settings = dict(memory_type=kind, memory_layers=[-1], segment_length=SEGMENT, bptt_segments=3)
    config = MemLMConfig(
        text_config=base_config(model_type), **kind_settings_only(dict(settings, memory_dtype="bfloat16"))
    )
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    saved, loaded = config.to_dict(), again.to_dict()
    loaded.pop("_name_or_path"), saved.pop("_name_or_path")
    assert loaded == saved
    assert MemLMConfig.from_dict(config.to_dict()).to_json_string() == config.to_json_string()
    assert again.memory_layers == [1] and again.text_config.model_type == model_type


def test_memory_state_save_load_round_trip(tmp_path):
    model = build("llama", "kv")
    with torch.no_grad():
        out = model(_ids())
    out.memory_state.save(tmp_path / "memory.safetensors")
    loaded = MemoryState.load(tmp_path / "memory.safetensors")
    assert loaded.memory_type == "kv" and loaded.layers.keys() == out.memory_state.layers.keys()
    for layer, tensors in out.memory_state.layers.items():
        for name, tensor in tensors.items():
            assert torch.equal(loaded.layers[layer][name], tensor)
    with torch.no_grad():
        nxt = _ids(2, SEGMENT)
        torch.testing.assert_close(
            model(nxt, memory_state=loaded).logits, model(nxt, memory_state=out.memory_state).logits
        )


def test_generation_window_survives_save(tmp_path):
    """A state returned mid-generation (window tokens still in the cache) saves, loads and commits."""
    model = build("llama", "kv")
    with torch.no_grad():
        out = model(_ids(1, SEGMENT + 3), use_cache=True)
    state = out.memory_state
    assert state.window_length == 3
    state.save(tmp_path / "m.safetensors")
    loaded = MemoryState.load(tmp_path / "m.safetensors")
    assert loaded.window_length == 3
    committed = model.commit_window(loaded)
    assert not committed.window
    with torch.no_grad():
        reference = model(_ids(1, SEGMENT + 3)).memory_state
    for name, tensor in reference.layers[0].items():
        torch.testing.assert_close(committed.layers[0][name], tensor)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_memlm"] = None  # hf_memlm cannot be imported in this process
    try:
        import hf_memlm  # noqa: F401
        raise SystemExit("hf_memlm was importable")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file
    results = {}
    for folder in sys.argv[1:]:
        model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = load_file(folder + "/expected.safetensors")
        with torch.no_grad():
            logits = model.eval()(expected["input_ids"]).logits
        weights = model.state_dict()
        # compared with the original model's own state dict: checkpoint files may rename keys on save
        original = load_file(folder + "/expected_weights.safetensors")
        same = weights.keys() == original.keys() and all(torch.equal(weights[k], v) for k, v in original.items())
        results[folder] = {"max_diff": (logits - expected["logits"]).abs().max().item(), "weights_equal": same}
    print(json.dumps(results))
    """
)


def test_trust_remote_code_without_the_package(tmp_path):
    """Every architecture x kind loads through trust_remote_code in a process where hf_memlm cannot be
    imported (one subprocess for the whole table, to keep the suite fast)."""
    from safetensors.torch import save_file

    folders = []
    for base in BASES:
        for kind in KINDS:
            folder = tmp_path / f"{base}-{kind}"
            model = build(base, kind)
            model.save_pretrained(folder)
            ids = _ids()
            with torch.no_grad():
                save_file({"input_ids": ids, "logits": model(ids).logits}, str(folder / "expected.safetensors"))
            weights = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(folder / "expected_weights.safetensors"))
            folders.append(str(folder))
    results = run_python_json(REMOTE_SCRIPT, folders, tmp_path)
    for folder, result in results.items():
        assert result["weights_equal"], folder
        assert result["max_diff"] < 1e-5, (folder, result)
    assert len(results) == len(BASES) * len(KINDS)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_reload_in_another_dtype(tmp_path, dtype):
    model = build("qwen2", "kv")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert {p.dtype for p in reloaded.parameters()} == {dtype}
    with torch.no_grad():
        assert torch.isfinite(reloaded(_ids()).logits).all()


@pytest.mark.parametrize("first_sharded", [True, False], ids=["shards-then-one-file", "one-file-then-shards"])
def test_saving_over_another_models_weights_leaves_none_of_them(tmp_path, first_sharded):
    """Weight files of an earlier save that this save did not rewrite would be loaded instead of it (a stale
    model.safetensors shadows new shards) or linger (an index naming old shards, a pickled pytorch_model.bin)."""
    old, new = build("llama", "kv", seed=0), build("llama", "kv", seed=1)
    old.save_pretrained(tmp_path, max_shard_size="20KB" if first_sharded else "50GB")
    (tmp_path / "pytorch_model.bin").write_bytes(b"stale pickle")
    new.save_pretrained(tmp_path, max_shard_size="50GB" if first_sharded else "20KB")
    names = sorted(p.name for p in tmp_path.iterdir() if "model" in p.name and not p.name.endswith(".py"))
    if first_sharded:
        assert names == ["model.safetensors"]
    else:
        assert "model.safetensors" not in names and "pytorch_model.bin" not in names
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(names) == sorted({"model.safetensors.index.json", *index["weight_map"].values()})
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path), new)


def test_saved_tokenizer_loads_without_remote_code_or_a_prompt(tmp_path):
    """The saved tokenizer is a plain tokenizer: where hf_memlm is not installed, `AutoTokenizer.from_pretrained(
    folder, trust_remote_code=False)` loads it without running remote code and without the "[y/N]" prompt
    (transformers reads config.json first, whose auto_map would otherwise ask), and it tokenizes as saved."""
    from hf_memlm.data import build_tokenizer

    build("llama", "kv").save_pretrained(tmp_path)
    tokenizer = build_tokenizer("byte")
    tokenizer.save_pretrained(tmp_path)
    code = (
        "import json, sys\n"
        "sys.modules['hf_memlm'] = None\n"
        "from transformers import AutoTokenizer\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=False)\n"
        "print(json.dumps({'ids': tokenizer('The pass key is 48213.')['input_ids'], 'module': type(tokenizer).__module__}))\n"
    )
    result = run_python_json(code, [str(tmp_path)], tmp_path)
    assert result["ids"] == tokenizer("The pass key is 48213.")["input_ids"]
    assert not result["module"].startswith("transformers_modules")
