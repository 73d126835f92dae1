"""Bad input gets a clear error that says what is wrong, and nothing is half-built."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import SEGMENT, VOCAB, base_config, build
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
        (dict(memory_type="slot", num_slots=0), "num_slots=0 must be a positive integer"),
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
    with pytest.raises(ValueError, match=re.escape(message)):
        MemLMConfig(text_config=base_config("llama"), **settings)


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
    # a causal LM class as far as the auto classes know, whose layers cannot be found
    AutoModelForCausalLM.register(_ToyConfig, _ToyModel, exist_ok=True)
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
    with pytest.raises(OSError, match="nowhere"):
        MemLMForCausalLM.from_base(str(tmp_path / "nowhere"))


def test_empty_input():
    model = build("llama", "kv")
    with pytest.raises(ValueError, match=r"input_ids has no tokens \(shape \(2, 0\)\)"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids has no rows \(shape \(0, 5\)\)"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="attention_mask is 0 for every token of every row"):
        model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.zeros(2, 4))


def test_input_of_the_wrong_rank():
    model = build("llama", "kv")
    with pytest.raises(
        ValueError, match=r"input_ids must be 2-D \(batch, tokens\), got shape \(5,\).*input_ids\[None\]"
    ):
        model(torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs_embeds must be 3-D \(batch, tokens, hidden\), got shape \(5, 32\)"):
        model(inputs_embeds=torch.zeros(5, 32))


@pytest.mark.parametrize(
    "bad_ids, message",
    [
        (torch.tensor([[3, 97, 4]]), r"input_ids must lie in \[0, 97\).*got values from 3 to 97"),
        (torch.tensor([[3, -1, 4]]), r"input_ids must lie in \[0, 97\).*got values from -1 to 4"),
    ],
)
def test_token_ids_out_of_range(bad_ids, message):
    model = build("llama", "kv")
    with pytest.raises(ValueError, match=message):
        model(bad_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_token_ids_that_are_not_integers(dtype):
    model = build("llama", "kv")
    with pytest.raises(TypeError, match=f"input_ids must hold integer token ids, got dtype {dtype}"):
        model(torch.ones(1, 4, dtype=dtype))


@pytest.mark.parametrize("kind", ["kv", "slot"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_rejected_before_touching_memory(kind, bad):
    model = build("llama", kind)
    with torch.no_grad():
        state = model(torch.arange(3, 3 + 2 * SEGMENT)[None]).memory_state
        embeds = model.get_input_embeddings()(torch.arange(3, 3 + SEGMENT)[None])
        embeds[0, 2, 5] = bad
        with pytest.raises(ValueError, match="inputs_embeds contains NaN or inf"):
            model(inputs_embeds=embeds, memory_state=state)


def test_all_labels_ignored_warns_once():
    model = build("llama", "kv")
    ids = torch.ones(1, SEGMENT, dtype=torch.long)
    with pytest.warns(UserWarning, match=r"every label is -100 \(ignored\)"):
        model(ids, labels=torch.full_like(ids, -100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(ids, labels=torch.full_like(ids, -100))  # once per model: no second warning
        model(ids, labels=ids)


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
    with pytest.raises(ValueError, match="text_config is itself a memlm config"):
        MemLMConfig(text_config=inner, memory_layers=[0], segment_length=SEGMENT)


def test_registration():
    from transformers import AutoConfig

    config = AutoConfig.for_model("memlm", text_config=base_config("llama"), memory_layers=[0])
    assert config.__class__ is hf_memlm.MemLMConfig


def test_config_without_text_config_is_an_error(tmp_path):
    """No silent default base (it was a 6.7B Llama): the config and a config.json without it fail clearly."""
    with pytest.raises(ValueError, match="MemLMConfig needs `text_config`"):
        MemLMConfig()
    with pytest.raises(ValueError, match="MemLMConfig needs `text_config`"):
        MemLMConfig(memory_type="slot", segment_length=SEGMENT)
    (tmp_path / "config.json").write_text('{"model_type": "memlm", "memory_type": "kv", "segment_length": 8}')
    with pytest.raises(ValueError, match=r"A config\.json of model_type .memlm. must contain it"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_round_trips_without_a_default(tmp_path):
    """save_pretrained diffs against defaults; with text_config required that must still work both ways."""
    config = MemLMConfig(text_config=base_config("gpt2"), memory_type="slot", memory_layers=[1], segment_length=SEGMENT)
    config.save_pretrained(tmp_path)
    loaded = MemLMConfig.from_pretrained(tmp_path)
    assert loaded.text_config.to_dict() == config.text_config.to_dict()
    assert (loaded.memory_type, loaded.memory_layers, loaded.segment_length) == ("slot", [1], SEGMENT)


@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_memory_state_of_another_dtype_is_cast(kind):
    """A state in another dtype (e.g. saved from a float64 or bf16 run) is cast to the model's, for every kind."""
    model = build("llama", kind)
    ids = torch.arange(3, 3 + SEGMENT)[None]
    with torch.no_grad():
        state = model(torch.arange(10, 10 + 2 * SEGMENT)[None]).memory_state
        expected = model(ids, memory_state=state)
        wide = model(ids, memory_state=state.to(torch.float64))
        narrow = model(ids, memory_state=state.to(torch.bfloat16))
    torch.testing.assert_close(wide.logits, expected.logits)
    assert narrow.logits.dtype == torch.float32
    torch.testing.assert_close(narrow.logits, expected.logits, rtol=0.05, atol=0.05)
    for out in (wide, narrow):
        for name, tensor in out.memory_state.layers[0].items():
            assert tensor.dtype == expected.memory_state.layers[0][name].dtype, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_memory_state_on_another_device_is_moved(kind):
    model = build("llama", kind)
    ids = torch.arange(3, 3 + SEGMENT)[None]
    with torch.no_grad():
        state = model(torch.arange(10, 10 + 2 * SEGMENT)[None]).memory_state
        expected = model(ids, memory_state=state).logits
        moved = model(ids, memory_state=state.to("cuda"))
    torch.testing.assert_close(moved.logits, expected)
    assert all(t.device.type == "cpu" for t in moved.memory_state.layers[0].values())


def test_generation_window_without_its_cache():
    """A state returned mid-generation still has tokens only in that call's KV cache: continuing it without
    the cache is refused with both ways out named."""
    model = build("llama", "kv")
    with torch.no_grad():
        out = model(torch.arange(3, 3 + SEGMENT + 3)[None], use_cache=True)
        ids = torch.arange(3, 8)[None]
        with pytest.raises(ValueError, match=r"no MemLMCache holding them was passed.*commit_window"):
            model(ids, memory_state=out.memory_state, use_cache=True)
        with pytest.raises(ValueError, match=r"holds a generation window.*commit_window"):
            model(ids, memory_state=out.memory_state)
        continued = model(ids, cache=out.cache, use_cache=True)
        committed = model(ids, memory_state=model.commit_window(out.memory_state))
    assert continued.logits.shape == committed.logits.shape == (1, 5, 97)


def _tiny(config_class, **settings):
    return config_class(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **settings)


def test_a_causal_base_with_is_decoder_false_in_its_config_is_accepted():
    """Configs saved by older transformers store is_decoder=false for every model; GPT-NeoX declares it."""
    for model_type in ("gpt_neox", "llama"):
        MemLMConfig(text_config=base_config(model_type, is_decoder=False), memory_layers=[0], segment_length=SEGMENT)


def test_a_bidirectional_encoder_base_is_refused():
    """A BERT encoder let position 0 see the last token; it is refused unless configured as a causal decoder."""
    from transformers import BertConfig

    with pytest.raises(ValueError, match=r"'bert' is configured as a bidirectional encoder \(is_decoder=False\)"):
        MemLMConfig(text_config=_tiny(BertConfig, intermediate_size=64), memory_layers=[0], segment_length=16)
    config = MemLMConfig(
        text_config=_tiny(BertConfig, intermediate_size=64, is_decoder=True), memory_layers=[0], segment_length=16
    )
    model = MemLMForCausalLM(config).eval()
    ids = torch.randint(3, 90, (1, 10))
    changed = ids.clone()
    changed[0, -1] = 91
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[0, :-1], model(changed).logits[0, :-1])


@pytest.mark.parametrize(
    "model_type, message",
    [
        ("xlnet", r"'xlnet' attends to later tokens \(it is not a causal LM\)"),
        ("t5", r"'t5' is an encoder-decoder model, not a causal LM"),
        ("mamba", r"'mamba' has recurrent \(state-space or linear-attention\) layers"),
        ("rwkv", r"'rwkv' has recurrent"),
        ("jamba", r"'jamba' has recurrent"),
    ],
)
def test_bases_that_are_not_causal_attention_decoders_are_refused(model_type, message):
    from transformers import AutoConfig

    with pytest.raises(ValueError, match=message + r".*Supported bases are decoder-only causal LMs.*tested: gpt2"):
        MemLMConfig(text_config=AutoConfig.for_model(model_type), memory_layers=[0], segment_length=16)


class _ToyEncoderConfig(PretrainedConfig):
    model_type = "toy_encoder"
    hidden_size: int = 8
    num_hidden_layers: int = 1


def test_a_base_without_a_causal_lm_class_is_refused():
    with pytest.raises(ValueError, match="'toy_encoder' has no causal-LM class"):
        MemLMConfig(text_config=_ToyEncoderConfig(), memory_layers=[0], segment_length=8)


@pytest.mark.parametrize(
    "typo, suggestion", [("memory_sise", "memory_size"), ("segment_lenght", "segment_length"), ("memory_foo", None)]
)
def test_misspelt_memory_settings_are_refused(typo, suggestion):
    message = f"unknown setting '{typo}'; " + (f"did you mean '{suggestion}'" if suggestion else "The memory settings")
    with pytest.raises(ValueError, match=message):
        MemLMConfig(text_config=base_config("llama"), **{typo: 10})


def test_text_config_dict_without_model_type_is_refused():
    """It became a default 4096-wide, 32-layer Llama."""
    with pytest.raises(ValueError, match="text_config is a dict without 'model_type'"):
        MemLMConfig(text_config={"hidden_size": 32, "num_hidden_layers": 2}, memory_layers=[0])


@pytest.fixture(scope="module")
def saved_kv_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kv_model")
    build("llama", "kv").save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(memory_size=0), "memory_size=0 must be a positive integer"),
        (dict(memory_topk=0), "memory_topk=0 must be a positive integer"),
        (dict(memory_topk=100), "memory_topk=100 is larger than memory_size=12"),
        (dict(memory_size=2), "memory_topk=4 is larger than memory_size=2"),
        (dict(memory_search="fast"), "memory_search='fast' is unknown"),
        (
            dict(segment_length=32),
            "segment_length=32 cannot change when loading a saved model (it holds segment_length=8)",
        ),
        (
            dict(memory_type="slot"),
            "memory_type='slot' cannot change when loading a saved model (it holds memory_type='kv')",
        ),
        (dict(memory_layers=[1]), "memory_layers=[1] cannot change"),
    ],
)
def test_load_time_settings_are_checked_as_at_construction(saved_kv_model, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoModelForCausalLM.from_pretrained(saved_kv_model, **settings)


def test_load_time_settings_that_keep_the_weights_meaning_still_apply(saved_kv_model):
    model = AutoModelForCausalLM.from_pretrained(saved_kv_model, memory_size=64, memory_topk=None, segment_length=8)
    assert (model.config.memory_size, model.config.memory_topk, model.config.segment_length) == (64, None, 8)


@pytest.mark.parametrize("where", ["absolute", "relative", "path object", "file", "folder without config"])
def test_from_base_names_a_missing_or_empty_local_folder(tmp_path, monkeypatch, where):
    """A missing local folder was reported as a malformed Hub id ("Repo id must be in the form ...")."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    base, message = {
        "absolute": ("/missing/folder", "the folder '/missing/folder' does not exist"),
        "relative": ("./missing", "the folder './missing' does not exist"),
        "path object": (Path("missing/model"), "the folder 'missing/model' does not exist"),
        "file": ("weights.bin", "'weights.bin' is a file"),
        "folder without config": ("empty", "the folder 'empty' has no config.json"),
    }[where]
    with pytest.raises(FileNotFoundError, match=re.escape(f"from_base: {message}")):
        MemLMForCausalLM.from_base(base)


def test_inputs_embeds_of_the_wrong_width_are_named():
    model = build("llama", "kv")
    with pytest.raises(ValueError, match=r"inputs_embeds has width 16 .* input embeddings have width 32"):
        model(inputs_embeds=torch.zeros(1, 4, 16))
