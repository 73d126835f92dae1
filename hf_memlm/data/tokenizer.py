"""Tokenizers that need no download: a byte tokenizer (ids 0..255 are the UTF-8 bytes) and a trained byte-level BPE.

Both are `transformers.PreTrainedTokenizerFast` objects built on the `tokenizers` library, so they save with
`save_pretrained` and load back with `AutoTokenizer.from_pretrained` like any Hub tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

# Appended after the 256 byte ids (byte kind) or first in the vocabulary (bpe kind, as BpeTrainer places them).
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
NUM_BYTES = 256
BYTE_VOCAB_SIZE = NUM_BYTES + len(SPECIAL_TOKENS)  # 260: what `tiny_llama_config()` is sized for
DEFAULT_BPE_VOCAB_SIZE = 1024
TOKENIZER_KINDS = ("byte", "bpe")


def build_tokenizer(kind: str = "byte", texts: Iterable[str] | None = None, vocab_size: int | None = None):
    """Build a tokenizer that works offline.

    Args:
        kind: `"byte"`: one token per UTF-8 byte (token id == byte value, 0..255), then `<pad>`=256, `<bos>`=257,
            `<eos>`=258, `<unk>`=259; nothing to train, every text round-trips exactly.
            `"bpe"`: a byte-level BPE (GPT-2 style pre-tokenization) trained on `texts`; special tokens get ids 0..3.
        texts: training texts for `"bpe"` (ignored by `"byte"`).
        vocab_size: `"byte"`: must be `None` or 260. `"bpe"`: target size including the 256 byte symbols and the
            4 special tokens (default 1024); training may stop below it when the texts have no more merges.

    Returns:
        a `transformers.PreTrainedTokenizerFast` with pad/bos/eos/unk set. It adds no special tokens on its own:
        callers that want `<bos>`/`<eos>` insert them explicitly.
    """
    if kind == "byte":
        if vocab_size is not None and vocab_size != BYTE_VOCAB_SIZE:
            raise ValueError(
                f"build_tokenizer: the byte tokenizer always has {BYTE_VOCAB_SIZE} tokens "
                f"({NUM_BYTES} bytes + {len(SPECIAL_TOKENS)} special), got vocab_size={vocab_size}; "
                "pass vocab_size=None, or use kind='bpe' for another size."
            )
        backend = _byte_backend()
    elif kind == "bpe":
        backend = _trained_bpe_backend(texts, DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size)
    else:
        raise ValueError(f"build_tokenizer: kind={kind!r} is unknown; choose one of {TOKENIZER_KINDS}.")
    return _wrap(backend)


def _byte_backend():
    """A BPE model without merges over the 256 byte symbols: byte b gets id b."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    vocab = {symbols[byte]: byte for byte in range(NUM_BYTES)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges to apply, splitting into words would only cost time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return backend


def _byte_symbols() -> dict[int, str]:
    """The printable character the ByteLevel pre-tokenizer maps each byte to (GPT-2's byte-to-unicode table)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, shift = {}, 0
    for byte in range(NUM_BYTES):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(NUM_BYTES + shift)
            shift += 1
    return symbols


def _trained_bpe_backend(texts: Iterable[str] | None, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if texts is None:
        raise ValueError(
            "build_tokenizer: kind='bpe' is trained on `texts`; pass a list of strings (e.g. [default_text()])."
        )
    if isinstance(texts, str):
        texts = [texts]
    texts = [text for text in texts if text]
    if not texts:
        raise ValueError("build_tokenizer: kind='bpe' got no non-empty text to train on; pass at least one string.")
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(
            f"build_tokenizer: a byte-level BPE needs vocab_size >= {BYTE_VOCAB_SIZE} "
            f"({NUM_BYTES} byte symbols + {len(SPECIAL_TOKENS)} special tokens), got vocab_size={vocab_size}."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable: no <unk> ever
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return backend


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    # clean_up_tokenization_spaces would rewrite " ." to "." on decode and break exact round trips.
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def tokenizer_size(tokenizer) -> int:
    """Number of ids the tokenizer can produce: base vocabulary plus added (special) tokens."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def check_tokenizer_fits(tokenizer, model_config) -> int:
    """Raise ValueError unless every id the tokenizer produces is below the model's `vocab_size`.

    `model_config` may be a base config (LlamaConfig, ...), a `MemLMConfig` (its `text_config` is checked) or a
    model. Returns the tokenizer size. A model vocabulary larger than the tokenizer is fine (unused rows).
    """
    config = getattr(model_config, "config", model_config)  # a model: look at its config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_vocab = getattr(text_config, "vocab_size", None)
    if not isinstance(model_vocab, int):
        raise TypeError(
            f"check_tokenizer_fits: the model config ({type(text_config).__name__}) has no integer vocab_size."
        )
    needed = tokenizer_size(tokenizer)
    if needed > model_vocab:
        raise ValueError(
            f"tokenizer has {needed} tokens (ids 0..{needed - 1}) but the model's vocab_size is {model_vocab}: "
            f"ids >= {model_vocab} would index past the embedding. Build the model with vocab_size >= {needed} "
            f"(e.g. tiny_llama_config(vocab_size={needed})) or use a smaller tokenizer."
        )
    return needed
