"""Streaming corpora: `load_text_corpus` and `pack_documents` take a `datasets.IterableDataset` end to end, and the
Trainer trains on the packed stream with `max_steps`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_memory
from datasets import Dataset, IterableDataset, IterableDatasetDict
from transformers import default_data_collator

import hf_memlm
from hf_memlm.data import build_tokenizer, load_text_corpus, pack_documents
from hf_memlm.data.tokenizer import BYTE_VOCAB_SIZE
from hf_memlm.recipes.defaults import tiny_llama_config
from hf_memlm.training import MemLMTrainer, MemLMTrainingArguments

SEGMENT, SEGMENTS = 8, 2  # windows of 16 byte tokens
DOCUMENTS = ["", "too short", "a document of forty-some bytes, two windows", "x" * 20, "", "y" * 50, "z" * 16]


def stream(**columns) -> IterableDataset:
    return Dataset.from_dict(columns).to_iterable_dataset(num_shards=2)


def test_a_stream_packs_into_the_same_examples_as_the_loaded_corpus():
    tokenizer = build_tokenizer("byte")
    loaded = pack_documents(load_text_corpus(Dataset.from_dict({"body": DOCUMENTS}), "body"), tokenizer, 8, 2)
    corpus = load_text_corpus(stream(body=DOCUMENTS, other=list(range(len(DOCUMENTS)))), text_column="body")
    assert isinstance(corpus, IterableDataset)
    assert [row["text"] for row in corpus] == [text for text in DOCUMENTS if text]  # empty documents dropped
    packed = pack_documents(corpus, tokenizer, SEGMENT, SEGMENTS)
    assert isinstance(packed, IterableDataset)
    assert sorted(packed.column_names) == ["document_index", "input_ids", "labels", "window_index"]
    assert list(packed) == loaded.to_list() and len(loaded) == 7


def test_local_files_and_splits_stream_when_asked(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": text}) + "\n" for text in DOCUMENTS))
    corpus = load_text_corpus(path, text_column="body", streaming=True)
    assert isinstance(corpus, IterableDataset)
    assert list(corpus) == load_text_corpus(path, text_column="body").to_list()
    splits = IterableDatasetDict({"train": stream(text=DOCUMENTS)})
    assert [row["text"] for row in load_text_corpus(splits)] == [text for text in DOCUMENTS if text]
    with pytest.raises(ValueError, match="has no split 'test'"):
        load_text_corpus(splits, split="test")


def test_bad_streams_get_the_errors_of_loaded_corpora():
    tokenizer = build_tokenizer("byte")
    with pytest.raises(ValueError, match="is empty: it holds no non-empty text"):
        load_text_corpus(stream(text=["", ""]))
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['body'\]"):
        load_text_corpus(stream(body=["a", "b"]))
    with pytest.raises(ValueError, match=r"no document of the stream is long enough.* = 16 tokens"):
        pack_documents(load_text_corpus(stream(text=["short", "also short"])), tokenizer, SEGMENT, SEGMENTS)


def test_the_trainer_trains_memory_on_a_packed_stream_with_max_steps(tmp_path):
    tokenizer = build_tokenizer("byte")
    texts = [f"document {i}: " + f"the key is {31 * i:05d}. " * 6 for i in range(12)]
    packed = pack_documents(load_text_corpus(stream(text=texts)), tokenizer, SEGMENT, SEGMENTS)
    text_config = tiny_llama_config(BYTE_VOCAB_SIZE, hidden_size=32, max_positions=64)
    torch.manual_seed(0)
    config = hf_memlm.MemLMConfig(
        text_config=text_config, memory_type="slot", memory_layers=[0], segment_length=SEGMENT, num_slots=8
    )
    model = hf_memlm.MemLMForCausalLM(config)
    randomize_memory(model, std=0.1)
    before = {name: p.detach().clone() for name, p in model.memory_blocks.named_parameters()}
    args = MemLMTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = MemLMTrainer(model=model, args=args, train_dataset=packed, data_collator=default_data_collator)
    trainer.train()
    assert trainer.state.global_step == 3
    unchanged = [name for name, p in model.memory_blocks.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged, unchanged


def test_a_hub_dataset_streams_when_asked(monkeypatch):
    """Faked: nothing can be downloaded in tests."""
    import datasets

    calls = []

    def fake_load_dataset(name, split, streaming=False):
        calls.append((name, split, streaming))
        return Dataset.from_dict({"story": ["a long tale", ""]}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stories = load_text_corpus("someone/stories", text_column="story", streaming=True)
    assert calls == [("someone/stories", "train", True)]
    assert isinstance(stories, IterableDataset) and list(stories) == [{"text": "a long tale"}]
