"""Training examples for the long-context suite, asked in chat (`make_chat_suite_dataset`)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_chat_kv_model

from hf_memlm.data import build_tokenizer, make_chat_suite_dataset, make_long_context_dataset
from hf_memlm.data.chat_suite import reply_for
from hf_memlm.data.long_context import ACTORS, BABILONG_TASKS, OBJECTS, PLACES, RULER_TASKS, question_prompt
from hf_memlm.evaluation.suite import encode_text
from hf_memlm.training.collate import LabelledTailCollator

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SEGMENT = 256  # byte tokens: the longest question and reply (variable tracking) take about 200
# a book whose sentences name bAbI's people, places and objects, as books do
BOOK = " ".join(
    f"Sentence {i} of the book tells of {'Mary in the garden' if i % 5 == 0 else 'the weather'} and more."
    for i in range(400)
)


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer("byte")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def examples(tokenizer):
    return make_chat_suite_dataset(tokenizer, 18, SEGMENT, 4, seed=0, text=BOOK)


def test_examples_hold_the_document_then_the_suite_question_from_a_segment_start(tokenizer, examples):
    tasks = [*RULER_TASKS, *BABILONG_TASKS]
    assert examples["task"] == tasks * 2  # every task in turn, equal shares
    for example in examples:
        start, ids, labels = example["question_start"], example["input_ids"], example["labels"]
        assert start == 3 * SEGMENT
        document = tokenizer.decode(ids[:start])
        # the question as the suite asks it in a fresh call: the chat template's user turn, from a segment start
        prompt = ids[start : start + example["prompt_length"]]
        question = tokenizer.decode(prompt).removeprefix("<user>").split("</user>")[0]
        assert prompt == encode_text(tokenizer, question_prompt(tokenizer, question))
        reply = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
        assert reply.endswith("</assistant>" + tokenizer.eos_token)
        assert all(label == -100 for label in labels[: start + example["prompt_length"]])
        for answer in example["answers"]:
            assert answer in reply
            if example["task"].startswith("niah"):  # a needle's value is written once; a variable is assigned
                assert document.count(answer) == 1  # and then read, a place may be named by several moves
            else:
                assert answer in document


def test_bAbI_filler_keeps_only_sentences_that_name_nothing_of_the_story(tokenizer, examples):
    # the book names Mary and the garden: its sentences that do are left out, so the answer comes from the story
    for example in examples:
        if example["task"] in BABILONG_TASKS:
            filler = [
                s
                for s in tokenizer.decode(example["input_ids"][: example["question_start"]]).split(". ")
                if "book" in s
            ]
            assert filler and not any("Mary" in s or "garden" in s for s in filler)
    suite = make_long_context_dataset("qa2", tokenizer, [2048], num_examples=3, seed=0, text=BOOK)
    words = [*ACTORS, *PLACES, *OBJECTS]
    for document in suite["document"]:
        assert not any(f"{word} in the garden" in document for word in words)  # no book sentence of Mary's


def test_replies_name_every_expected_string():
    assert reply_for("niah_multivalue", "The special magic numbers for x are", ["1", "2", "3"]) == (
        "The special magic numbers for x are 1, 2 and 3."
    )
    assert reply_for("qa3", "", ["kitchen"]) == "In the kitchen."


def test_the_same_seed_gives_the_same_examples_and_tasks_can_be_chosen(tokenizer, examples):
    again = make_chat_suite_dataset(tokenizer, 18, SEGMENT, 4, seed=0, text=BOOK)
    assert again["input_ids"] == examples["input_ids"]
    assert make_chat_suite_dataset(tokenizer, 18, SEGMENT, 4, seed=1, text=BOOK)["input_ids"] != examples["input_ids"]
    chosen = make_chat_suite_dataset(tokenizer, 4, SEGMENT, 4, tasks=["qa1", "niah_multikey"], text=BOOK)
    assert chosen["task"] == ["qa1", "niah_multikey"] * 2


def test_examples_refuse_what_cannot_be_built(tokenizer):
    with pytest.raises(ValueError, match="chat template"):
        make_chat_suite_dataset(build_tokenizer("byte"), 2, SEGMENT, 4, text=BOOK)
    with pytest.raises(ValueError, match="must fit in the last segment"):
        make_chat_suite_dataset(tokenizer, 6, 128, 4, text=BOOK)
    with pytest.raises(ValueError, match="at least 2"):
        make_chat_suite_dataset(tokenizer, 2, SEGMENT, 1, text=BOOK)
    with pytest.raises(ValueError, match="unknown suite or task"):
        make_chat_suite_dataset(tokenizer, 2, SEGMENT, 4, tasks=["qa9"], text=BOOK)


def test_a_batch_trains_the_memory_on_the_replies_only(tokenizer, examples):
    torch.manual_seed(0)
    model = tiny_chat_kv_model(tokenizer, SEGMENT, memory_size=4096).train()
    batch = LabelledTailCollator(pad_token_id=0)([examples[i] for i in range(4)])
    loss = model(**batch).loss
    loss.backward()
    memory = [p for n, p in model.named_parameters() if "memory" in n]
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in memory)


def test_read_targets_point_from_the_reply_to_each_value_written_once_in_the_document(tokenizer, examples):
    # at the reply's token before each token of an expected string, the document's column of that very token;
    # only where the document writes it once (a needle's value), none where a read could rightly take another copy
    for example in examples:
        ids, targets = example["input_ids"], example["read_targets"]
        assert len(targets) == len(ids)
        targeted = [column for column, target in enumerate(targets) if target != -100]
        reply_start = example["question_start"] + example["prompt_length"]
        for column in targeted:
            assert reply_start - 1 <= column < len(ids) - 1
            assert 0 <= targets[column] < example["question_start"]
            assert ids[targets[column]] == ids[column + 1]  # the token the reply writes next
        document = tokenizer.decode(ids[: example["question_start"]])
        once = [answer for answer in example["answers"] if document.count(answer) == 1]
        assert len(targeted) == sum(len(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in once)
        if example["task"].startswith("niah"):
            assert once == example["answers"]  # every value of every needle task is targeted
    # the collator pads them with the rest
    batch = LabelledTailCollator(pad_token_id=0, read_targets=True)([examples[i] for i in range(3)])
    assert batch["read_targets"].shape == batch["input_ids"].shape
