"""Bad input gets a clear error that says what is wrong, and nothing is half-built."""

from __future__ import annotations

import pytest
import torch
from conftest import SEGMENT, base_config, build
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

import hf_memlm
from hf_memlm import MemLMConfig, MemLMForCausalLM, MemoryState


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(memory_type="lstm"), "memory_type='lstm' is unknown"),
        (dict(memory_layers=[2]), "memory layer 2 is out of range for the base model (llama with 2 decoder layers"),
        (dict(memory_layers=[-3]), "memory layer -3 is out of range"),
        (dict(memory_layers=[]), "must be a non-empty list"),
        (dict(memory_layers=[0, -2]), "names a layer twice"),
        (dict(memory_layers=["0"]), "must be integers"),
        (dict(segment_length=0), "segment_length=0 must be a positive integer"),
        (dict(segment_length=4096), "exceeds the base model's max_position_embeddings=2048"),
        (dict(memory_heads=-1), "memory_heads=-1 must be a positive integer"),
        (dict(memory_heads=3), "not divisible by memory_heads=3"),
        (dict(num_slots=0), "num_slots=0 must be a positive integer"),
        (dict(memory_size=0), "memory_size=0 must be a positive integer"),
        (dict(memory_size=8, memory_topk=16), "memory_topk=16 is larger than memory_size=8"),
        (dict(memory_topk=0), "memory_topk=0 must be a positive integer"),
        (dict(bptt_segments=0), "bptt_segments=0 must be a positive integer"),
        (dict(memory_value_shift=2), "memory_value_shift=2 must be 0"),
        (dict(memory_dtype="int8"), "memory_dtype='int8' is not supported"),
        (dict(memory_init_std=-1.0), "memory_init_std=-1.0 must be a positive number"),
        (dict(segment_length=2.5), "segment_length=2.5 must be a positive integer"),
    ],
)
def test_invalid_config_values(settings, message):
    with pytest.raises(ValueError) as error:
        MemLMConfig(text_config=base_config("llama"), **settings)
    assert message in str(error.value)


class _ToyConfig(PretrainedConfig):
    model_type = "toy_no_layers"
    hidden_size: int = 8
    num_hidden_layers: int = 1


class _ToyModel(PreTrainedModel):
    config_class = _ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(8, 8)
        self.post_init()


def test_unsupported_base_is_named_and_left_untouched():
    base = _ToyModel(_ToyConfig())
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="cannot find the decoder layers of a 'toy_no_layers' model"):
        MemLMForCausalLM.from_base(base, memory_layers=[0], segment_length=8)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_bad_settings_leave_the_base_untouched():
    base = AutoModelForCausalLM.from_config(base_config("llama"))
    with pytest.raises(ValueError, match="out of range"):
        MemLMForCausalLM.from_base(base, memory_layers=[7])
    with pytest.raises(TypeError, match="unknown memory settings \\['memory_slots'\\]"):
        MemLMForCausalLM.from_base(base, memory_slots=4)
    layers = base.model.layers
    assert all(not layer._forward_hooks for layer in layers), "a failed wrap left hooks on the base"


def test_wrapping_a_wrapped_base_twice_is_rejected():
    model = build("llama", "kv")
    with pytest.raises(ValueError, match="already wrapped by a MemLMForCausalLM"):
        MemLMForCausalLM.from_base(model.language_model, memory_layers=[1], segment_length=SEGMENT)


def test_from_base_rejects_other_objects():
    with pytest.raises(TypeError, match="expects a model id, a local folder or a PreTrainedModel"):
        MemLMForCausalLM.from_base(42)


def test_from_base_missing_folder(tmp_path):
    with pytest.raises(OSError):
        MemLMForCausalLM.from_base(str(tmp_path / "nowhere"))


def test_empty_input():
    model = build("llama", "kv")
    with pytest.raises(ValueError, match="The input is empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_mismatched_mask_and_labels():
    model = build("llama", "kv")
    ids = torch.ones(2, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="attention_mask covers 9 tokens but the input has 10"):
        model(ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="labels have shape \\(2, 9\\), expected \\(2, 10\\)"):
        model(ids, labels=torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="do not pass position_ids"):
        model(ids, position_ids=torch.arange(10)[None])


def test_memory_state_of_wrong_batch_size():
    model = build("llama", "kv")
    state = model(torch.ones(3, SEGMENT, dtype=torch.long)).memory_state
    with pytest.raises(ValueError, match="memory_state has batch size 3 but the input has 2 rows"):
        model(torch.ones(2, SEGMENT, dtype=torch.long), memory_state=state)


def test_memory_state_of_one_row_is_shared_by_a_batch():
    model = build("llama", "kv")
    with torch.no_grad():
        state = model(torch.arange(2 * SEGMENT)[None] % 50 + 3).memory_state
        ids = torch.randint(3, 50, (3, SEGMENT))
        out = model(ids, memory_state=state).logits
        alone = model(ids[1:2], memory_state=state).logits
    torch.testing.assert_close(out[1:2], alone)


def test_memory_state_of_wrong_shape_or_kind():
    kv_model, slot_model = build("llama", "kv"), build("llama", "slot")
    ids = torch.ones(1, SEGMENT, dtype=torch.long)
    kv_state = kv_model(ids).memory_state
    with pytest.raises(ValueError, match="memory_state holds 'kv' memory but this model uses 'slot'"):
        slot_model(ids, memory_state=kv_state)
    other = MemLMForCausalLM(
        MemLMConfig(
            text_config=base_config("llama"),
            memory_type="kv",
            memory_layers=[0],
            segment_length=SEGMENT,
            memory_heads=4,
            memory_size=12,
            memory_topk=4,
        )
    )
    with pytest.raises(ValueError, match=r"has shape .* this model stores \(batch, 2 heads, entries, 16\)"):
        kv_model(ids, memory_state=other(ids).memory_state)
    moved = MemoryState("kv", {1: kv_state.layers[0]})
    with pytest.raises(ValueError, match="memory_state has layers \\[1\\] but this model has memory at \\[0\\]"):
        kv_model(ids, memory_state=moved)
    with pytest.raises(TypeError, match=r"memory_state must be a hf_memlm\.MemoryState"):
        kv_model(ids, memory_state={"keys": torch.zeros(1)})
    broken = MemoryState("slot", {0: {"memory": torch.zeros(1, 3, 32)}})
    with pytest.raises(ValueError, match="keeps \\(batch, 6 slots, 32\\)"):
        slot_model(ids, memory_state=broken)


def test_memory_state_file_of_another_format(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="is not a MemoryState file"):
        MemoryState.load(path)


def test_nested_memlm_is_rejected():
    inner = MemLMConfig(text_config=base_config("llama"), memory_layers=[0], segment_length=SEGMENT)
    with pytest.raises(ValueError):
        MemLMForCausalLM(MemLMConfig(text_config=inner, memory_layers=[0], segment_length=SEGMENT))


def test_registration():
    from transformers import AutoConfig

    assert AutoConfig.for_model("memlm").__class__ is hf_memlm.MemLMConfig
