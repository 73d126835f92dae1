"""Training examples for the long-context suite, asked in chat: RULER's needle tasks, variable tracking and
BABILong-style bAbI questions (`hf_memlm.data.long_context`), laid out as the suite asks them.

    document  filler with the task's sentences between its sentences   (num_segments - 1 whole segments)
    question  <chat template>user: What is the special magic number for blue door mentioned in the text?
              assistant: The special magic number for blue door is 4821337.<end of turn>   (the labelled reply)

The suite reads a document into memory and asks its question in a fresh call (`hf_memlm.evaluation.suite`); here
the question starts the last segment, so training sees what the evaluation does. The tasks come in turn, in equal
shares; each draws its sentences, question and answers as the suite's generator does, and its filler from the
same kind of text (RULER's noise for the single needle in noise and for variable tracking, the book otherwise;
for bAbI, the book's sentences that name none of the story's people, places and objects).
A document shorter than its segments by a few tokens (filler ends on a whole word) starts with newlines.

Columns: input_ids, labels (the reply only), question_start ((num_segments - 1) * segment_length), prompt_length
(tokens of the question up to the reply), task, answers, and read_targets (for `training.read_loss_weight`): at the
reply's token before each token of an expected string, the column of that token in the document, where the string
is written there exactly once with the same tokens (RULER's values; -100 elsewhere: a variable's name, or a bAbI
place, is written more than once and the read may take any of them).
"""

from __future__ import annotations

import numpy as np

from .chat_passkey import chat_turn_ids, check_chat_segments, document_then_question, key_tokens
from .layout import IGNORE_INDEX, check_positive_int, encode, to_dataset
from .long_context import BABILONG_TASKS, Haystack, default_filler, draw_task, suite_tasks, task_haystack


def reply_for(task: str, answer_prefix: str, answers: list[str]) -> str:
    """The reply the model learns: RULER's answer prefix and every expected string; bAbI's place."""
    if task in BABILONG_TASKS:
        return f"In the {answers[0]}."
    listed = answers[0] if len(answers) == 1 else ", ".join(answers[:-1]) + " and " + answers[-1]
    return f"{answer_prefix} {listed}."


def make_chat_suite_dataset(
    tokenizer,
    num_examples: int,
    segment_length: int,
    num_segments: int,
    seed: int = 0,
    text: str | None = None,
    tasks=("ruler", "babilong"),
):
    """`num_examples` suite examples of `num_segments - 1` segments of document and a chat question and reply.

    Args:
        text: the book for natural filler (default: the bundled excerpt).
        tasks: suites ("ruler", "babilong") or single tasks of them, taken in turn.
    """
    check_positive_int("num_examples", num_examples)
    check_positive_int("segment_length", segment_length)
    check_chat_segments(num_segments)
    tasks = suite_tasks(tasks)
    fillers, haystacks = {}, {}  # the text of each filler kind, and what each task draws from it
    rng = np.random.default_rng(seed)
    document_length = (num_segments - 1) * segment_length
    newline = encode(tokenizer, "\n")
    rows = []
    for number in range(num_examples):
        task = tasks[number % len(tasks)]
        if task not in haystacks:
            filler = default_filler(task)
            if filler not in fillers:
                fillers[filler] = Haystack(tokenizer, filler, text if filler == "natural" else None)
            haystacks[task] = task_haystack(fillers[filler], task)
        haystack = haystacks[task]
        question, answer_prefix, pieces, answers, _ = draw_task(task, rng, haystack)
        document, _ = haystack.document(rng, pieces, document_length, task, document_length)
        ids = encode(tokenizer, document)  # at most document_length: `document` counts the whole text's tokens
        ids = np.concatenate([np.resize(newline, document_length - len(ids)), ids])
        exchange, prompt_length = chat_turn_ids(tokenizer, question, reply_for(task, answer_prefix, answers))
        try:
            columns = document_then_question(ids, exchange, prompt_length, segment_length)
        except ValueError as error:
            raise ValueError(f"{task}: {error}") from None
        reply_start = document_length + prompt_length
        columns["read_targets"] = answer_read_targets(
            tokenizer, ids, exchange[prompt_length:], reply_start, len(columns["input_ids"]), answers
        )
        rows.append({**columns, "task": task, "answers": list(answers)})
    return to_dataset({name: [row[name] for row in rows] for name in rows[0]})


def answer_read_targets(tokenizer, document, reply, reply_start: int, length: int, answers) -> np.ndarray:
    """`read_targets` of one example of `length` tokens whose reply starts at `reply_start`: for each answer written
    in the reply, at the reply's token before each of its tokens, the column of that token in `document` (which
    starts at column 0), when the document holds the same tokens exactly once; -100 elsewhere."""
    targets = np.full(length, IGNORE_INDEX, dtype=np.int64)
    document = np.asarray(document)
    for answer in answers:
        in_reply = key_tokens(tokenizer, reply, answer)
        if in_reply is None or in_reply[0] == 0:
            continue
        first, end = in_reply
        starts = _occurrences(document, np.asarray(reply[first:end]))
        if len(starts) == 1:
            targets[reply_start + first - 1 : reply_start + end - 1] = starts[0] + np.arange(end - first)
    return targets


def _occurrences(ids: np.ndarray, run: np.ndarray) -> np.ndarray:
    """The columns where `run` starts in `ids`."""
    if len(run) == 0 or len(run) > len(ids):
        return np.empty(0, dtype=np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, len(run))
    return np.flatnonzero((windows == run).all(axis=1))


__all__ = ["answer_read_targets", "make_chat_suite_dataset", "reply_for"]
