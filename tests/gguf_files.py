"""A tiny Llama written as a GGUF file with the `gguf` package, so the GGUF loader is tested without the 93 MB
shipped file. Weights are stored the way llama.cpp's converter stores them (q/k rows permuted for its rotary
layout; transformers undoes that on load)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf `permute`: rotary pairs (i, i + d/2) become neighbours
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_llama_gguf(model, path: Path) -> Path:
    """Write `model` (a small `LlamaForCausalLM`, float32) as a GGUF file at `path`."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    state = {name: tensor.detach().to(torch.float32).numpy() for name, tensor in model.state_dict().items()}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(config.num_hidden_layers):
        for ours, theirs in per_layer.items():
            names[f"model.layers.{layer}.{ours}.weight"] = f"blk.{layer}.{theirs}.weight"
    for name, gguf_name in names.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        weight = state[name]
        if gguf_name.endswith("attn_q.weight"):
            weight = _permute(weight, config.num_attention_heads)
        elif gguf_name.endswith("attn_k.weight"):
            weight = _permute(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
