"""Embedded defaults for jobs that run with no download: a tiny base-model config (the bundled text is
`hf_memlm.data.default_text`)."""

from __future__ import annotations


def tiny_llama_config(vocab_size: int = 260, hidden_size: int = 64, num_layers: int = 2, max_positions: int = 2048):
    """A Llama-architecture base small enough to train on two CPU cores."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
