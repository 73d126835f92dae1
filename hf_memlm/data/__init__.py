"""Data for training and measuring memory LMs, all offline: tokenizers, long documents, synthetic tasks.

    from hf_memlm.data import build_tokenizer, load_text_corpus, pack_documents, make_passkey_dataset

    tokenizer = build_tokenizer("byte")                       # 260 ids: bytes 0..255, <pad> <bos> <eos> <unk>
    books = load_text_corpus("/path/to/books")                # column "text", one row per document
    train = pack_documents(books, tokenizer, segment_length=128, num_segments=8)
    stream = load_text_corpus("someone/corpus", streaming=True)  # an IterableDataset, packed as it is read:
    train = pack_documents(stream, tokenizer, 128, 8)         # train on it with the Trainer's max_steps
    passkey = make_passkey_dataset(tokenizer, 1000, segment_length=128, num_segments=8)
    updates = make_update_dataset(tokenizer, 1000, segment_length=128, num_segments=8)  # latest fact wins
    ruler = make_long_context_dataset("niah_multikey", tokenizer, ["4k", "16k"], num_examples=20)  # RULER, BABILong
    suite = make_chat_suite_dataset(tokenizer, 1000, segment_length=256, num_segments=8)  # trains for the suite

The column conventions of the synthetic tasks are documented in `hf_memlm.data.tasks`.
"""

from .bundled import default_text
from .chat_passkey import make_chat_passkey_dataset
from .chat_suite import make_chat_suite_dataset
from .corpus import load_text_corpus, pack_documents
from .layout import FILLER_KINDS, IGNORE_INDEX, SYNTHETIC_FILLER
from .long_context import make_long_context_dataset
from .tasks import TASK_BUILDERS as _TASK_BUILDERS
from .tasks import make_copy_dataset, make_passkey_dataset, make_recall_dataset
from .tokenizer import BYTE_VOCAB_SIZE, SPECIAL_TOKENS, build_tokenizer, check_tokenizer_fits, tokenizer_size
from .updates import make_update_dataset

# the generators by task name (the `data.task` / `--task` values)
TASK_BUILDERS = {
    **_TASK_BUILDERS,
    "update": make_update_dataset,
    "chat_passkey": make_chat_passkey_dataset,
    "chat_suite": make_chat_suite_dataset,
}

__all__ = [
    "BYTE_VOCAB_SIZE",
    "FILLER_KINDS",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "SYNTHETIC_FILLER",
    "TASK_BUILDERS",
    "build_tokenizer",
    "check_tokenizer_fits",
    "default_text",
    "load_text_corpus",
    "make_chat_passkey_dataset",
    "make_chat_suite_dataset",
    "make_copy_dataset",
    "make_long_context_dataset",
    "make_passkey_dataset",
    "make_recall_dataset",
    "make_update_dataset",
    "pack_documents",
    "tokenizer_size",
]
