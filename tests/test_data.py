"""hf_memlm.data: tokenizers, corpus loading and packing, synthetic tasks (tiny sizes, seconds in total)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from hf_memlm.data import (
    BYTE_VOCAB_SIZE,
    IGNORE_INDEX,
    build_tokenizer,
    check_tokenizer_fits,
    default_text,
    load_text_corpus,
    make_copy_dataset,
    make_passkey_dataset,
    make_recall_dataset,
    pack_documents,
)
from hf_memlm.data.tasks import PASSKEY_NEEDLE_PREFIX, PASSKEY_NEEDLE_SUFFIX, PASSKEY_QUESTION
from hf_memlm.recipes.defaults import tiny_llama_config

L, S = 64, 6  # segment_length, num_segments used by most task tests


@pytest.fixture(scope="module")
def byte_tokenizer():
    return build_tokenizer("byte")


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return build_tokenizer("bpe", texts=[default_text()], vocab_size=400)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_ids_are_utf8_bytes_and_round_trip(byte_tokenizer, tmp_path):
    text = "Héllo, wörld ✓\n  tabs\tand 0123"
    ids = byte_tokenizer(text)["input_ids"]  # no special tokens are added by default
    assert ids == list(text.encode("utf-8"))
    assert byte_tokenizer.decode(ids) == text
    assert len(byte_tokenizer) == BYTE_VOCAB_SIZE == 260
    specials = [byte_tokenizer.pad_token_id, byte_tokenizer.bos_token_id, byte_tokenizer.eos_token_id]
    assert specials + [byte_tokenizer.unk_token_id] == [256, 257, 258, 259]

    byte_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert len(loaded) == 260


def test_bpe_tokenizer_trains_and_round_trips(bpe_tokenizer, tmp_path):
    text = "It is a truth universally acknowledged. Ünïcödé ✓ 48213"
    ids = bpe_tokenizer(text)["input_ids"]
    assert bpe_tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges learned from the book compress English
    assert len(bpe_tokenizer) == 400 and max(ids) < 400
    bpe_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids) == text
    assert loaded.eos_token == "<eos>"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "wordpiece"}, "kind='wordpiece' is unknown"),
        ({"kind": "bpe"}, "trained on `texts`"),
        ({"kind": "bpe", "texts": ["", ""]}, "no non-empty text"),
        ({"kind": "bpe", "texts": ["abc"], "vocab_size": 100}, "needs vocab_size >= 260"),
        ({"kind": "byte", "vocab_size": 300}, "always has 260 tokens"),
    ],
)
def test_build_tokenizer_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tokenizer(**kwargs)


def test_check_tokenizer_fits(byte_tokenizer):
    from hf_memlm import MemLMConfig

    assert check_tokenizer_fits(byte_tokenizer, tiny_llama_config(vocab_size=260)) == 260
    assert check_tokenizer_fits(byte_tokenizer, tiny_llama_config(vocab_size=512)) == 260
    with pytest.raises(ValueError, match=r"tokenizer has 260 tokens .* the model's vocab_size is 256"):
        check_tokenizer_fits(byte_tokenizer, tiny_llama_config(vocab_size=256))
    memlm = MemLMConfig(text_config=tiny_llama_config(vocab_size=200), memory_layers=[0], segment_length=16)
    with pytest.raises(ValueError, match=r"260 tokens .* vocab_size is 200"):
        check_tokenizer_fits(byte_tokenizer, memlm)


# ---------------------------------------------------------------- corpus


def _write_corpus(folder):
    folder.mkdir()
    (folder / "a_book.txt").write_text("First book.\n\nIt has paragraphs.\n", encoding="utf-8")
    with open(folder / "b_records.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"body": text, "id": 1}) + "\n" for text in ["record one", "", "record two"])
    Dataset.from_dict({"body": ["parquet doc"]}).to_parquet(str(folder / "c_table.parquet"))
    return folder


def test_load_text_corpus_files_and_folders(tmp_path):
    folder = _write_corpus(tmp_path / "corpus")
    book = load_text_corpus(folder / "a_book.txt")
    assert book.column_names == ["text"] and book["text"] == ["First book.\n\nIt has paragraphs.\n"]  # one document
    records = load_text_corpus(str(folder / "b_records.jsonl"), text_column="body")
    assert records["text"] == ["record one", "record two"]  # empty documents dropped
    assert load_text_corpus(folder / "c_table.parquet", text_column="body")["text"] == ["parquet doc"]
    everything = load_text_corpus(folder, text_column="body")  # sorted file order, .txt always "text"
    assert everything["text"] == ["First book.\n\nIt has paragraphs.\n", "record one", "record two", "parquet doc"]
    given = load_text_corpus(Dataset.from_dict({"content": ["x", "y"], "other": [1, 2]}), text_column="content")
    assert given.column_names == ["text"] and given["text"] == ["x", "y"]


def test_load_text_corpus_hub_id_goes_to_load_dataset(monkeypatch):
    """A name that is no local path is loaded from the Hub (faked here: nothing can be downloaded in tests)."""
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "someone/missing":
            raise FileNotFoundError("Dataset 'someone/missing' doesn't exist on the Hub")
        return Dataset.from_dict({"story": ["a long tale", ""], "id": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stories = load_text_corpus("someone/stories", text_column="story", split="validation")
    assert calls == [("someone/stories", "validation")] and stories["text"] == ["a long tale"]
    with pytest.raises(ValueError, match=r"'someone/missing' is not a local file or folder, and loading it as a Hub"):
        load_text_corpus("someone/missing")


def test_load_text_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus file .*missing\.txt does not exist"):
        load_text_corpus(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_text_corpus(tmp_path / "empty.txt")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has no column 'text'; its columns are \['body'\]"):
        load_text_corpus(tmp_path / "rows.jsonl")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported extension '\.md'"):
        load_text_corpus(tmp_path / "notes.md")


# ---------------------------------------------------------------- packing


def test_pack_documents_keeps_document_order(byte_tokenizer):
    segment_length, num_segments = 8, 3
    window = segment_length * num_segments
    texts = [default_text()[:100], "too short", default_text()[5000:5075]]  # 4 windows, none, 3 windows
    packed = pack_documents(Dataset.from_dict({"text": texts}), byte_tokenizer, segment_length, num_segments)
    assert set(packed.column_names) >= {"input_ids", "labels", "document_index", "window_index"}
    assert packed["document_index"] == [0, 0, 0, 0, 2, 2, 2]
    assert packed["window_index"] == [0, 1, 2, 3, 0, 1, 2]
    assert all(len(ids) == window for ids in packed["input_ids"])
    assert packed["labels"] == packed["input_ids"]
    for document in (0, 2):
        rows = [row for row in packed if row["document_index"] == document]
        stream = [token for row in rows for token in row["input_ids"]]
        expected = list(texts[document].encode("utf-8"))
        assert stream == expected[: len(stream)] and len(expected) - len(stream) < window


def test_pack_documents_errors(byte_tokenizer):
    short = Dataset.from_dict({"text": ["tiny", "a bit longer"]})
    with pytest.raises(ValueError, match=r"longest has 12 tokens, but one example needs .* = 4 \* 8 = 32 tokens"):
        pack_documents(short, byte_tokenizer, segment_length=8, num_segments=4)
    with pytest.raises(ValueError, match="segment_length must be a positive integer, got 0"):
        pack_documents(short, byte_tokenizer, segment_length=0, num_segments=4)
    with pytest.raises(ValueError, match="has no column 'body'"):
        pack_documents(short, byte_tokenizer, 8, 2, text_column="body")


# ---------------------------------------------------------------- synthetic tasks


def _labelled_spans(labels):
    """(start, end) of each run of labelled positions."""
    marked = np.asarray(labels) != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], marked.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _check_answers(example, tokenizer, segment_length, num_segments):
    """Labels sit exactly on the answers, which equal the tokens written earlier; distances are consistent."""
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) == segment_length * num_segments
    listed = isinstance(example["answer"], list)
    columns = ("answer", "answer_start", "answer_length", "written_start", "distance_tokens", "distance_segments")
    answers = zip(*(example[name] if listed else [example[name]] for name in columns))
    expected_spans = []
    for answer, start, length, written, distance, distance_segments in answers:
        answer_ids = ids[start : start + length]
        assert labels[start : start + length] == answer_ids
        assert tokenizer.decode(answer_ids).strip() == answer
        assert ids[written : written + length] == answer_ids  # the information really was written there
        assert written // segment_length == (written + length - 1) // segment_length  # not split by a boundary
        assert start // segment_length == num_segments - 1  # asked for in the last segment
        assert distance == start - written and distance_segments == start // segment_length - written // segment_length
        expected_spans.append((start, start + length))
    labelled = [position for begin, end in _labelled_spans(labels) for position in range(begin, end)]
    expected = [position for begin, end in expected_spans for position in range(begin, end)]
    if "question_start" in example:  # passkey: the reply is the space before the key, the key, the end marker
        (start, end), reply_end = expected_spans[0], expected_spans[0][1] + 1
        assert ids[end] == tokenizer.eos_token_id
        space_apart = tokenizer.decode(ids[start - 1 : start]) == " "  # byte tokens; a BPE merges it ("Ġ48213")
        expected = list(range(start - 1 if space_apart else start, reply_end))
    assert labelled == expected


TASKS = [
    (make_passkey_dataset, {}),
    (make_passkey_dataset, {"filler": "synthetic", "needle_segment": [0, 2]}),
    (make_recall_dataset, {"num_pairs": 6, "num_queries": 4, "write_segments": 2}),
    (make_copy_dataset, {"copy_length": 20}),
]


@pytest.mark.parametrize("make, kwargs", TASKS)
def test_task_answers_are_where_the_labels_say(byte_tokenizer, make, kwargs):
    dataset = make(byte_tokenizer, 6, L, S, **kwargs)
    assert len(dataset) == 6
    for example in dataset:
        _check_answers(example, byte_tokenizer, L, S)


@pytest.mark.parametrize("make, kwargs", TASKS)
def test_tasks_are_deterministic_for_a_seed(byte_tokenizer, make, kwargs):
    first = make(byte_tokenizer, 4, L, S, seed=3, **kwargs)
    again = make(byte_tokenizer, 4, L, S, seed=3, **kwargs)
    other = make(byte_tokenizer, 4, L, S, seed=4, **kwargs)
    assert first.to_dict() == again.to_dict()
    assert first["input_ids"] != other["input_ids"] and first["answer"] != other["answer"]


def test_tasks_work_with_a_bpe_tokenizer(bpe_tokenizer):
    for make, kwargs in TASKS:
        for example in make(bpe_tokenizer, 3, L, 4, **kwargs):
            _check_answers(example, bpe_tokenizer, L, 4)


def test_passkey_needle_placement(byte_tokenizer):
    dataset = make_passkey_dataset(byte_tokenizer, 8, L, S, needle_segment=1)
    for example in dataset:
        needle = f"{PASSKEY_NEEDLE_PREFIX} {example['answer']}{PASSKEY_NEEDLE_SUFFIX}".encode()
        start = example["needle_start"]
        assert bytes(example["input_ids"][start : start + len(needle)]) == needle
        assert start // L == (start + len(needle) - 1) // L == 1 == example["needle_segment"]
        assert example["distance_segments"] == S - 1 - 1
        ending = example["input_ids"][-46:]
        assert ending[-1] == byte_tokenizer.eos_token_id  # the end marker closes the reply
        assert bytes(ending[:-1]).decode().endswith(f"What is the pass key? The pass key is {example['answer']}")
        assert len(example["answer"]) == example["answer_length"] == 5  # the answer (scored) is the key alone
    random_depth = make_passkey_dataset(byte_tokenizer, 30, L, S)
    assert set(random_depth["needle_segment"]) <= set(range(S - 1)) and len(set(random_depth["needle_segment"])) > 2
    assert len({tuple(ids[L : L + 16]) for ids in random_depth["input_ids"]}) > 20  # filler read from random offsets
    in_window = make_passkey_dataset(byte_tokenizer, 3, 128, 2, needle_segment=1)  # needle and question share it
    assert in_window["distance_segments"] == [0, 0, 0]
    for example in in_window:
        _check_answers(example, byte_tokenizer, 128, 2)


def test_passkey_reply_is_what_the_model_must_produce(byte_tokenizer):
    """The labels cover " 48213<eos>": the space before the key (given in the question, the model could not
    answer a prompt without it) and the end marker after it; the answer columns keep the key alone."""
    for example in make_passkey_dataset(byte_tokenizer, 4, L, S):
        reply = [token for token in example["labels"] if token != IGNORE_INDEX]
        assert reply == list(f" {example['answer']}".encode()) + [byte_tokenizer.eos_token_id]
        start, length = example["answer_start"], example["answer_length"]
        assert bytes(example["input_ids"][start : start + length]).decode() == example["answer"]
    for example in make_passkey_dataset(byte_tokenizer, 2, L, S, end_marker=False):
        reply = [token for token in example["labels"] if token != IGNORE_INDEX]
        assert reply == list(f" {example['answer']}".encode())
        assert bytes(example["input_ids"][-6:]).decode() == f" {example['answer']}"


def test_passkey_question_at_random_positions_of_the_last_segment(byte_tokenizer):
    question = PASSKEY_QUESTION.encode()
    dataset = make_passkey_dataset(byte_tokenizer, 60, L, S, question_position="random", seed=5)
    starts = dataset["question_start"]
    reply_length = 1 + 5 + 1
    assert all((S - 1) * L <= start <= S * L - len(question) - reply_length for start in starts)
    assert min(starts) - (S - 1) * L <= 2 and S * L - len(question) - reply_length - max(starts) <= 2  # both ends
    for example in dataset:
        _check_answers(example, byte_tokenizer, L, S)
        start = example["question_start"]
        assert bytes(example["input_ids"][start : start + len(question)]) == question
        assert example["answer_start"] == start + len(question) + 1
    # the default asks at the very end, as before
    assert make_passkey_dataset(byte_tokenizer, 3, L, S)["question_start"] == [S * L - len(question) - reply_length] * 3
    # a needle in the last segment is asked about after it
    shared = make_passkey_dataset(byte_tokenizer, 20, 128, 2, needle_segment=1, question_position="random")
    for example in shared:
        needle_end = example["needle_start"] + len(f"{PASSKEY_NEEDLE_PREFIX} 00000{PASSKEY_NEEDLE_SUFFIX}")
        assert needle_end <= example["question_start"]
        _check_answers(example, byte_tokenizer, 128, 2)


def test_passkey_distractors_are_other_numbers_over_the_filler(byte_tokenizer):
    import re

    crowded = make_passkey_dataset(byte_tokenizer, 6, L, S, seed=3, filler="synthetic", distractors=4)
    for example in crowded:
        ids, key = example["input_ids"], example["answer"]
        numbers = re.findall(r"(?<![0-9])[0-9]+(?![0-9])", byte_tokenizer.decode(ids))
        # the key twice (needle, reply), four other 5-digit numbers (a drawn number may equal the key)
        assert len(numbers) == 6 and numbers.count(key) >= 2 and all(len(n) == 5 for n in numbers)
        # the needle and the question are intact, and only the reply is labelled
        needle = f"{PASSKEY_NEEDLE_PREFIX} {key}{PASSKEY_NEEDLE_SUFFIX}"
        start = example["needle_start"]
        assert byte_tokenizer.decode(ids[start : start + len(needle)]) == needle
        start = example["question_start"]
        assert byte_tokenizer.decode(ids[start : start + len(PASSKEY_QUESTION)]) == PASSKEY_QUESTION
        reply = [token for token in example["labels"] if token != IGNORE_INDEX]
        assert reply == list(f" {key}".encode()) + [byte_tokenizer.eos_token_id]
        _check_answers(example, byte_tokenizer, L, S)
    # introduced like the key by other phrases
    phrases = [" The room number is", " The year was"]
    for example in make_passkey_dataset(byte_tokenizer, 4, L, S, seed=4, distractors=3, distractor_prefixes=phrases):
        text = byte_tokenizer.decode(example["input_ids"])
        introduced = re.findall(r"(?: The room number is| The year was) ([0-9]{5})\.", text)
        assert len(introduced) == 3 and text.count(" The pass key is ") == 2
    # a list of counts is drawn from per example
    mixed = make_passkey_dataset(byte_tokenizer, 40, L, S, seed=5, distractors=[0, 3], distractor_prefixes=phrases)
    counts = [
        len(re.findall(r"(?: The room number is| The year was) [0-9]{5}\.", byte_tokenizer.decode(e["input_ids"])))
        for e in mixed
    ]
    assert set(counts) == {0, 3} and 10 <= counts.count(0) <= 30
    for wrong in (-1, [], [2, -1], True):
        with pytest.raises(ValueError, match="distractors must be a non-negative integer or a non-empty list"):
            make_passkey_dataset(byte_tokenizer, 2, L, S, distractors=wrong)
    with pytest.raises(ValueError, match="distractor_prefixes must be a non-empty list of non-empty phrases"):
        make_passkey_dataset(byte_tokenizer, 2, L, S, distractors=1, distractor_prefixes=" The year was")


def test_passkey_book_numbers_are_written_over_the_filler_and_leave_needle_and_reply_intact(byte_tokenizer):
    import re

    # `numbers`: 1-5 digits after book phrases (" CHAPTER 83."), a count drawn per example from a list; 0 draws
    # nothing, so the examples of a config without them stay the same
    plain = make_passkey_dataset(byte_tokenizer, 20, L, S, seed=6, distractors=[0, 3])
    assert make_passkey_dataset(byte_tokenizer, 20, L, S, seed=6, distractors=[0, 3], numbers=0)[:] == plain[:]
    examples = make_passkey_dataset(byte_tokenizer, 40, L, S, seed=6, numbers=[0, 4], question_position="random")
    counts, key_digit_first = [], 0
    for example in examples:
        text, key = byte_tokenizer.decode(example["input_ids"]), example["answer"]
        written = re.findall(r"(?<! is) (\d{1,5})\.", text)  # every number but the needle's and the reply's key
        counts.append(len(written))
        key_digit_first += sum(number[0] in key for number in written)
        needle = f"{PASSKEY_NEEDLE_PREFIX} {key}{PASSKEY_NEEDLE_SUFFIX}"
        assert byte_tokenizer.decode(example["input_ids"][example["needle_start"] :][: len(needle)]) == needle
        reply = [token for token in example["labels"] if token != IGNORE_INDEX]
        assert reply == list(f" {key}".encode()) + [byte_tokenizer.eos_token_id]
        _check_answers(example, byte_tokenizer, L, S)
    assert set(counts) == {0, 4} and 10 <= counts.count(0) <= 30
    assert key_digit_first > 0  # half start with a digit of the key, which is what makes them confusable
    # "with_distractors": an example drawn without distractors holds no other number at all
    phrase = " The room key is"
    paired = make_passkey_dataset(
        byte_tokenizer, 40, L, S, seed=7, distractors=[0, 2], distractor_prefixes=[phrase], numbers=3,
        numbers_where="with_distractors",
    )  # fmt: skip
    kinds = set()
    for example in paired:
        text = byte_tokenizer.decode(example["input_ids"])
        kinds.add((text.count(phrase), len(re.findall(r"(?<! is) (\d{1,5})\.", text))))
    assert kinds == {(0, 0), (2, 3)}
    with pytest.raises(ValueError, match="numbers must be a non-negative integer or a non-empty list"):
        make_passkey_dataset(byte_tokenizer, 2, L, S, numbers=[3, -1])
    with pytest.raises(
        ValueError, match=r"numbers_where='plain' is unknown; choose one of \('all', 'with_distractors'\)"
    ):
        make_passkey_dataset(byte_tokenizer, 2, L, S, numbers=1, numbers_where="plain")


def test_passkey_reply_options_are_checked(byte_tokenizer):
    with pytest.raises(ValueError, match=r"question_position='middle' is unknown; choose one of \('end', 'random'\)"):
        make_passkey_dataset(byte_tokenizer, 2, L, S, question_position="middle")
    with pytest.raises(ValueError, match="end_marker must be true or false, got 'yes'"):
        make_passkey_dataset(byte_tokenizer, 2, L, S, end_marker="yes")
    no_eos = build_tokenizer("byte")
    no_eos.eos_token = None
    with pytest.raises(ValueError, match=r"this tokenizer has no eos_token; set one .* or pass end_marker=False"):
        make_passkey_dataset(no_eos, 2, L, S)
    assert len(make_passkey_dataset(no_eos, 2, L, S, end_marker=False)) == 2


def test_recall_pairs_and_queries(byte_tokenizer):
    dataset = make_recall_dataset(byte_tokenizer, 5, L, S, num_pairs=10, num_queries=3, write_segments=2)
    for example in dataset:
        text = bytes(example["input_ids"]).decode("utf-8")
        assert len(example["query_keys"]) == len(set(example["query_keys"])) == 3
        for key, value, written in zip(example["query_keys"], example["answer"], example["written_start"]):
            assert f" {key}:{value}" in text[: 2 * L]  # the pair was written in the first two segments
            assert written < 2 * L
        assert example["num_pairs"] == 10
    single_segment = make_recall_dataset(byte_tokenizer, 3, 128, 1, num_pairs=4)
    for example in single_segment:
        _check_answers(example, byte_tokenizer, 128, 1)
        assert example["distance_segments"] == [0] * 4


def test_copy_source_and_copy(byte_tokenizer):
    dataset = make_copy_dataset(byte_tokenizer, 4, L, S, copy_length=10, source_segment=2)
    for example in dataset:
        text = bytes(example["input_ids"]).decode("utf-8")
        assert f" [{example['answer']}] " in text and text.endswith(f" Copy: [{example['answer']}")
        assert example["written_start"] // L == 2 and example["distance_segments"] == S - 1 - 2
        assert example["answer_length"] == example["copy_length"] == 10


def test_task_error_messages(byte_tokenizer):
    with pytest.raises(ValueError, match=r"needle_segment=6 is out of range: with num_segments=6 .* from 0 to 5"):
        make_passkey_dataset(byte_tokenizer, 2, L, S, needle_segment=6)
    with pytest.raises(ValueError, match="needle_segment=-1 is out of range"):
        make_passkey_dataset(byte_tokenizer, 2, L, S, needle_segment=-1)
    with pytest.raises(ValueError, match="needle_segment=5 is the last segment"):
        make_passkey_dataset(byte_tokenizer, 2, L, S, needle_segment=5)
    with pytest.raises(ValueError, match="question and answer take 45 tokens but segment_length=32"):
        make_passkey_dataset(byte_tokenizer, 2, 32, S)
    with pytest.raises(ValueError, match="filler='poetry' is unknown"):
        make_passkey_dataset(byte_tokenizer, 2, L, S, filler="poetry")
    with pytest.raises(ValueError, match="num_examples must be a positive integer, got 0"):
        make_passkey_dataset(byte_tokenizer, 0, L, S)
    with pytest.raises(ValueError, match=r"too many recall pairs for the space: num_pairs=12 .* at most 10 pairs fit"):
        make_recall_dataset(byte_tokenizer, 2, L, S, num_pairs=12, num_queries=2)
    with pytest.raises(ValueError, match="num_queries=11 queries take 66 tokens"):
        make_recall_dataset(byte_tokenizer, 2, L, S, num_pairs=11, num_queries=11, write_segments=2)
    with pytest.raises(ValueError, match="only 3\\*\\*2 = 9 keys"):
        make_recall_dataset(byte_tokenizer, 2, L, S, num_pairs=10, key_alphabet="abc")
    with pytest.raises(ValueError, match="write_segments=6 leaves no later segment"):
        make_recall_dataset(byte_tokenizer, 2, L, S, write_segments=6)
    with pytest.raises(ValueError, match="copy_length=60 is too long"):
        make_copy_dataset(byte_tokenizer, 2, L, S, copy_length=60)


def test_task_batch_trains_a_memory_model(byte_tokenizer):
    """The columns feed MemLMForCausalLM directly: exact lengths, labels only on answers, loss is finite."""
    import torch

    from hf_memlm import MemLMConfig, MemLMForCausalLM

    torch.manual_seed(0)
    config = MemLMConfig(text_config=tiny_llama_config(), memory_type="kv", memory_layers=[0], segment_length=L)
    model = MemLMForCausalLM(config)
    check_tokenizer_fits(byte_tokenizer, model)
    batch = make_passkey_dataset(byte_tokenizer, 2, L, 3).with_format("torch", columns=["input_ids", "labels"])[:]
    output = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert output.logits.shape == (2, 3 * L, 260) and torch.isfinite(output.loss)
