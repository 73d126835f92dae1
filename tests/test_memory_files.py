"""MemoryState files: saving never destroys another file, loading rejects damaged or mislabelled files."""

from __future__ import annotations

import json
import os
import struct
import warnings

import pytest
import torch
from conftest import SEGMENT, build
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_memlm
from hf_memlm import MemoryState


def _state(kind="kv", batch=2):
    model = build("llama", kind)
    ids = torch.randint(3, 90, (batch, 2 * SEGMENT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).memory_state


def _write_raw(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_save_refuses_to_overwrite_model_weights(tmp_path):
    model = build("llama", "kv")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(ValueError, match=r"refusing to overwrite .*model\.safetensors.*not a MemoryState file"):
        _state().save(weights)
    assert weights.read_bytes() == before
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


@pytest.mark.parametrize("content", [b"my notes", b"\x00" * 3])
def test_save_refuses_to_overwrite_other_files(tmp_path, content):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        _state().save(path)
    assert path.read_bytes() == content


def test_save_overwrites_an_earlier_memory_file_and_empty_files(tmp_path):
    path = tmp_path / "memory.safetensors"
    _state(batch=1).save(path)
    _state(batch=3).save(path)
    assert MemoryState.load(path).batch_size == 3
    empty = tmp_path / "empty.safetensors"
    empty.touch()
    _state().save(empty)
    assert MemoryState.load(empty).batch_size == 2


def test_save_to_a_folder_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        _state().save(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _state().save(tmp_path / "missing" / "memory.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous file intact and no partial file behind."""
    import hf_memlm.memory_state as memory_state

    path = tmp_path / "memory.safetensors"
    _state(batch=1).save(path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(memory_state, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _state(batch=3).save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["memory.safetensors"]


def test_load_rejects_folder_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match=r"is a folder"):
        MemoryState.load(tmp_path)
    (tmp_path / "empty.safetensors").touch()
    with pytest.raises(ValueError, match=r"empty\.safetensors is empty"):
        MemoryState.load(tmp_path / "empty.safetensors")
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        MemoryState.load(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("keep", [4, 100, -10])
def test_load_rejects_truncated_files(tmp_path, keep):
    path = tmp_path / "memory.safetensors"
    _state().save(path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"memory\.safetensors .*truncated"):
        MemoryState.load(path)


def test_load_rejects_a_garbage_header(tmp_path):
    path = tmp_path / "memory.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{oops" + b"\x00" * 16)
    with pytest.raises(ValueError, match=r"memory\.safetensors is truncated or damaged.*invalid JSON in header"):
        MemoryState.load(path)


def _relabel(path, **metadata):
    """Rewrite the file's metadata, keeping its tensors (a file whose metadata lies)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        original = handle.metadata()
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={**original, **metadata})


def test_load_rejects_metadata_naming_another_memory_type(tmp_path):
    path = tmp_path / "memory.safetensors"
    _state("kv").save(path)
    _relabel(path, memory_type="slot")
    with pytest.raises(ValueError, match=r"does not match its metadata: layer 0 holds tensors .*'slot' memory stores"):
        MemoryState.load(path)
    _relabel(path, memory_type="tape")
    with pytest.raises(ValueError, match=r"names memory type 'tape'"):
        MemoryState.load(path)


def test_load_rejects_metadata_naming_other_layers(tmp_path):
    path = tmp_path / "memory.safetensors"
    _state("kv").save(path)
    _relabel(path, layers="[0, 1]")
    with pytest.raises(ValueError, match=r"layer 1 holds tensors \[\]"):
        MemoryState.load(path)
    _relabel(path, layers="[1]")
    with pytest.raises(ValueError, match=r"holds tensor 'layer\.0\.\w+', which belongs to no layer listed"):
        MemoryState.load(path)
    _relabel(path, layers="zero")
    with pytest.raises(ValueError, match=r"damaged metadata: 'layers'"):
        MemoryState.load(path)


def test_load_rejects_tensors_of_different_batch_sizes(tmp_path):
    path = tmp_path / "memory.safetensors"
    _state("kv").save(path)
    tensors = load_file(str(path))
    tensors["layer.0.valid"] = torch.zeros(5, tensors["layer.0.valid"].shape[1], dtype=torch.bool)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="do not share one batch size"):
        MemoryState.load(path)


def test_load_rejects_out_of_range_offsets(tmp_path):
    path = tmp_path / "memory.safetensors"
    header = {
        "__metadata__": {"format": "hf_memlm.MemoryState/1", "memory_type": "slot", "layers": "[0]"},
        "layer.0.memory": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
    }
    _write_raw(path, header, b"\x00" * 8)
    with pytest.raises(ValueError, match=r"memory\.safetensors is truncated or damaged.*not fully covered"):
        MemoryState.load(path)


def test_generate_save_memory_onto_the_weights_keeps_the_model(tmp_path, capsys):
    """`hf-memlm generate MODEL --save-memory MODEL/model.safetensors` must not destroy the model."""
    from hf_memlm.cli import main
    from hf_memlm.data import build_tokenizer
    from hf_memlm.modeling_memlm import MemLMForCausalLM
    from hf_memlm.recipes.defaults import tiny_llama_config

    config = hf_memlm.MemLMConfig(text_config=tiny_llama_config(hidden_size=32), memory_layers=[0], segment_length=16)
    MemLMForCausalLM(config).save_pretrained(tmp_path)
    build_tokenizer("byte").save_pretrained(tmp_path)
    document = tmp_path / "doc.txt"
    document.write_text("The pass key is 12345. " * 8)
    weights = tmp_path / "model.safetensors"
    before = weights.read_bytes()
    argv = ["generate", str(tmp_path), "--prompt", "key", "--read", str(document), "--save-memory", str(weights)]
    try:
        code = main([*argv, "--max-new-tokens", "2", "--device", "cpu"])
    except ValueError as error:  # the command line may also report it as an error message and exit code 2
        assert "refusing to overwrite" in str(error)
    else:
        assert code == 2 and "refusing to overwrite" in capsys.readouterr().err
    assert weights.read_bytes() == before
    AutoModelForCausalLM.from_pretrained(tmp_path)  # still a loadable model


def test_load_rejects_nan_and_inf_values(tmp_path):
    """A memory saved from a run that overflowed gave NaN logits silently."""
    path = tmp_path / "memory.safetensors"
    _state().save(path)
    tensors = load_file(str(path))
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        metadata = json.loads(handle.read(length))["__metadata__"]
    tensors["layer.0.values"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=r"memory\.safetensors holds NaN or inf values \(in 'layer\.0\.values'\)"):
        MemoryState.load(path)


def test_load_warns_when_another_model_wrote_the_memory(tmp_path):
    writer, other = build("llama", "kv", seed=0), build("llama", "kv", seed=1)
    path = tmp_path / "memory.safetensors"
    with torch.no_grad():
        writer(torch.arange(3, 3 + 2 * SEGMENT)[None]).memory_state.save(path, model=writer)
    with pytest.warns(UserWarning, match=r"was written by a model with other weights than this one"):
        MemoryState.load(path, model=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MemoryState.load(path, model=writer)
        MemoryState.load(path)  # no model to compare with


def test_load_onto_cuda_without_cuda_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "memory.safetensors"
    _state().save(path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"onto 'cuda': CUDA is not available here.*device='cpu'"):
        MemoryState.load(path, device="cuda")
    with pytest.raises(ValueError, match=r"'gpu' is not a device"):
        MemoryState.load(path, device="gpu")


def test_saves_racing_to_one_path_never_look_damaged(tmp_path):
    """A thread saving states of different sizes to one path while others check it (as every save does
    first): they must only ever see whole MemoryState files, never a header of one and the size of another."""
    from conftest import run_in_threads

    path = tmp_path / "memory.safetensors"
    states = [_state(batch=1), _state(batch=3)]
    states[0].save(path)
    done = []

    def task(thread):
        if thread == 0:
            for step in range(60):
                states[step % 2].save(path)
            done.append(True)
            return 0
        damaged = 0
        while not done:
            damaged += not hf_memlm.memory_state.is_memory_file(path)
        return damaged

    assert sum(run_in_threads(task, 4).values()) == 0
    assert MemoryState.load(path).batch_size in (1, 3)
