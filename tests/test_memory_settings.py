"""Each memory kind's settings: declared by its settings class (registered with its block), checked per kind,
given to the blocks as `config.memory_settings`; the config imports no torch; today's flat config.json loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from conftest import base_config
from transformers import AutoModelForCausalLM

import hf_memlm
from hf_memlm.memory_settings import KVSettings, SlotSettings

PACKAGE = Path(hf_memlm.__file__).parent


def test_the_config_imports_neither_torch_nor_a_memory_block(tmp_path):
    # The payload as save_pretrained copies it (flat files), imported where torch cannot be: the config
    # builds, checks and describes its kind's settings with transformers alone.
    payload = tmp_path / "payload"
    payload.mkdir()
    for path in PACKAGE.glob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            shutil.copy(path, payload / path.name)
    (payload / "__init__.py").write_text("")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any import of torch fails
        sys.modules["hf_memlm"] = None
        from payload.configuration_memlm import MemLMConfig
        text = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "vocab_size": 97}
        config = MemLMConfig(text_config=text, memory_type="slot", num_slots=8, memory_layers=[-1])
        print(repr(config.memory_settings), config.memory_layers)
        print(sorted(name for name in sys.modules if name.startswith("payload.")))
        """
    )
    env = dict(os.environ, PYTHONPATH="", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    settings, modules = result.stdout.splitlines()
    assert settings == "SlotSettings(num_slots=8, memory_value_shift=1) [1]"
    assert modules == str(["payload.configuration_memlm", "payload.memory_kinds", "payload.memory_settings"])


def test_each_kind_gets_its_own_settings():
    kv = hf_memlm.MemLMConfig(text_config=base_config("llama"), memory_size=64, memory_topk=None)
    assert kv.memory_settings == KVSettings(memory_size=64, memory_topk=None)
    slot = hf_memlm.MemLMConfig(text_config=base_config("llama"), memory_type="slot", num_slots=8)
    assert slot.memory_settings == SlotSettings(num_slots=8)
    model = hf_memlm.MemLMForCausalLM(slot)
    assert model.memory_blocks[str(slot.memory_layers[0])].num_slots == 8


def test_a_setting_of_another_kind_is_ignored_with_a_warning_naming_it():
    with pytest.warns(UserWarning, match=r"memory_topk=8 is a setting of other memory kinds, not of 'slot' memory"):
        config = hf_memlm.MemLMConfig(text_config=base_config("llama"), memory_type="slot", memory_topk=8)
    # left at its default, so the config says and saves what the model does
    assert config.memory_topk == KVSettings.memory_topk and config.to_dict()["memory_topk"] == KVSettings.memory_topk
    # ignored, so not checked either: a top-k above the (kv) size would otherwise be refused
    with pytest.warns(UserWarning, match="memory_size=4, memory_topk=8 are settings of other memory kinds"):
        hf_memlm.MemLMConfig(text_config=base_config("llama"), memory_type="slot", memory_size=4, memory_topk=8)


def _old_style_slot_folder(tmp_path) -> Path:
    """A slot model saved as config.json files have held it: every kind's settings flat, kv ones not default."""
    config = hf_memlm.MemLMConfig(text_config=base_config("llama"), memory_type="slot", num_slots=8)
    hf_memlm.MemLMForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(memory_size=2048, memory_topk=16, memory_search="exact")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    return tmp_path


def test_an_old_style_config_json_loads_without_warnings(tmp_path):
    folder = _old_style_slot_folder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.memory_settings == SlotSettings(num_slots=8)


def test_load_time_settings_are_the_kinds_own(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"memory_size cannot be set when loading this model: memory_size is a setting "
        r"of 'kv' memory, and this model has 'slot' memory. Its settings that may change at load time: "
        r"bptt_segments",
    ):
        AutoModelForCausalLM.from_pretrained(_old_style_slot_folder(tmp_path / "slot"), memory_size=4096)
    config = hf_memlm.MemLMConfig(text_config=base_config("llama"), memory_size=64, memory_topk=8)
    hf_memlm.MemLMForCausalLM(config).save_pretrained(tmp_path / "kv")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "kv", memory_size=4096, memory_topk=None)
    assert model.config.memory_settings == KVSettings(memory_size=4096, memory_topk=None)
    block = model.memory_blocks[str(config.memory_layers[0])]
    assert (block.capacity, block.topk) == (4096, None)
    with pytest.raises(
        ValueError,
        match=r"num_slots cannot be set when loading this model: num_slots is a setting of "
        r"'slot' memory",
    ):
        AutoModelForCausalLM.from_pretrained(tmp_path / "kv", num_slots=8)
