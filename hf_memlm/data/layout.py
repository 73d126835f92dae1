"""Building blocks of the synthetic tasks: filler text, pieces placed inside one segment, labels on answers.

Every task example starts as `num_segments * segment_length` filler tokens; the task then writes its pieces (a
needle, key-value pairs, a string to copy, the question) over the filler at chosen positions and marks the answer
tokens in `labels`. Pieces are tokenized separately, so the ids of an answer are identical where it is written and
where it is asked for, whatever the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .bundled import default_text

IGNORE_INDEX = -100  # label value the loss skips
FILLER_KINDS = ("natural", "synthetic")
# The classic passkey filler (Landmark Attention, Mohtashami & Jaggi 2023).
SYNTHETIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# What introduces the numbers a book holds (`numbers` of the pass-key tasks): chapters, years, pages, counts, bare.
NUMBER_PREFIXES = (" CHAPTER", " in the year", " page", " No.", " about", " the", "")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_counts(function: str, name: str, value) -> list[int] | None:
    """The counts to draw one of per example when `value` is a list (None for one fixed count), after a clear
    error unless `value` is a non-negative integer or a non-empty list of them."""
    drawn = isinstance(value, (list, tuple))
    counts = list(value) if drawn else [value]
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
        raise ValueError(
            f"{function}: {name} must be a non-negative integer or a non-empty list of them, got {value!r}."
        )
    return counts if drawn else None


def book_number(rng, key: str, max_digits: int) -> str:
    """A number as books write them (" CHAPTER 83."), of 1 to `max_digits` digits, starting with one of `key`'s
    digits half of the time (so that a digit of the key is not the only one followed by another)."""
    digits = int(rng.integers(1, max_digits + 1))
    first = key[int(rng.integers(len(key)))] if rng.random() < 0.5 else str(int(rng.integers(1, 10)))
    rest = "".join(str(int(d)) for d in rng.integers(0, 10, digits - 1))
    return f"{NUMBER_PREFIXES[int(rng.integers(len(NUMBER_PREFIXES)))]} {first}{rest}."


def encode(tokenizer, text: str) -> np.ndarray:
    """Token ids of `text` with no special tokens added."""
    return np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=np.int64)


class FillerStream:
    """Tokens of a filler text, read from a random offset and wrapped around so any length can be drawn.

    `kind="natural"`: `text` (default: the bundled book excerpt `hf_memlm.data.default_text()`);
    `kind="synthetic"`: the repeated sentences of `SYNTHETIC_FILLER`.
    """

    def __init__(self, tokenizer, kind: str = "natural", text: str | None = None):
        if kind == "natural":
            if text is None:
                text = default_text()
        elif kind == "synthetic":
            text = SYNTHETIC_FILLER
        else:
            raise ValueError(f"filler={kind!r} is unknown; choose one of {FILLER_KINDS}.")
        self.tokens = encode(tokenizer, text)
        if len(self.tokens) == 0:
            raise ValueError("the filler text is empty: pass a non-empty text= (or filler='synthetic').")

    def draw(self, rng: np.random.Generator, length: int) -> np.ndarray:
        start = int(rng.integers(len(self.tokens)))
        return self.tokens[(start + np.arange(length)) % len(self.tokens)]


class ExampleLayout:
    """One example under construction: filler tokens, labels all ignored, and a record of what was written where."""

    def __init__(self, filler_tokens: np.ndarray, segment_length: int):
        self.tokens = np.array(filler_tokens, dtype=np.int64)
        self.labels = np.full(len(self.tokens), IGNORE_INDEX, dtype=np.int64)
        self.segment_length = segment_length
        self._taken = np.zeros(len(self.tokens), dtype=bool)

    def write(self, start: int, ids: np.ndarray) -> int:
        """Put `ids` at `start` (over the filler); returns the position just after them."""
        end = start + len(ids)
        if start < 0 or end > len(self.tokens) or self._taken[start:end].any():
            raise AssertionError(f"task layout bug: piece [{start}, {end}) overlaps another piece or the example end")
        self.tokens[start:end] = ids
        self._taken[start:end] = True
        return end

    def write_somewhere_free(self, rng, ids: np.ndarray, attempts: int = 100) -> int | None:
        """Put `ids` over filler at a random place that overlaps nothing written; returns its start, or None
        when no free place was found in `attempts` draws (a crowded example keeps its filler there)."""
        last_start = len(self.tokens) - len(ids)
        for _ in range(attempts if last_start >= 0 else 0):
            start = int(rng.integers(last_start + 1))
            if not self._taken[start : start + len(ids)].any():
                self.write(start, ids)
                return start
        return None

    def write_answer(self, start: int, ids: np.ndarray) -> int:
        """Like `write`, and the loss is taken on these tokens."""
        end = self.write(start, ids)
        self.labels[start:end] = ids
        return end


def random_start_in_segment(rng, segment: int, segment_length: int, length: int, end_limit: int | None = None) -> int:
    """A random start so that `length` tokens lie inside `segment` (and end by `end_limit`): never split by a boundary."""
    first = segment * segment_length
    last_end = first + segment_length if end_limit is None else min(first + segment_length, end_limit)
    if last_end - length < first:
        raise AssertionError(f"task layout bug: {length} tokens do not fit in segment {segment}")
    return int(rng.integers(first, last_end - length + 1))


def resolve_segments(requested, num_segments: int, name: str) -> list[int] | None:
    """Validate a segment choice: an int, a sequence of ints to draw from, or None (the caller's default)."""
    if requested is None:
        return None
    choices = [requested] if isinstance(requested, (int, np.integer)) else list(requested)
    if not choices:
        raise ValueError(f"{name} is an empty list; give a segment index, a list of them, or None for random.")
    for choice in choices:
        if isinstance(choice, bool) or not isinstance(choice, (int, np.integer)) or not 0 <= choice < num_segments:
            raise ValueError(
                f"{name}={choice!r} is out of range: with num_segments={num_segments} it must be an integer from "
                f"0 to {num_segments - 1} (or None for a random earlier segment)."
            )
    return [int(choice) for choice in choices]


def draw_segment(rng, choices: Sequence[int] | None, num_segments: int) -> int:
    """One segment from `choices`; by default a random segment before the last (the last one asks the question)."""
    if choices is None:
        return int(rng.integers(max(num_segments - 1, 1)))
    return choices[int(rng.integers(len(choices)))]


def place_before_question(
    rng,
    filler_stream,
    *,
    segment_choices,
    num_segments: int,
    segment_length: int,
    item: np.ndarray,
    question_and_answer: int,
    names: tuple[str, str, str, str],
) -> tuple[ExampleLayout, int, int]:
    """A filler example with `item` written inside one drawn segment, leaving the last `question_and_answer`
    tokens for the question and its answer. Returns (layout, item_start, segment).

    `names` = (function, segment option, item, question) words for the error when the item is drawn into
    the last segment but does not fit there beside the question.
    """
    function, option, item_name, question_name = names
    total = segment_length * num_segments
    segment = draw_segment(rng, segment_choices, num_segments)
    end_limit = None
    if segment == num_segments - 1:
        if len(item) + question_and_answer > segment_length:
            raise ValueError(
                f"{function}: {option}={segment} is the last segment, which also holds the {question_name}: "
                f"{item_name} ({len(item)} tokens) + {question_name} ({question_and_answer}) do not fit in "
                f"segment_length={segment_length}. Choose a {option} from 0 to {num_segments - 2}."
            )
        end_limit = total - question_and_answer
    layout = ExampleLayout(filler_stream.draw(rng, total), segment_length)
    item_start = random_start_in_segment(rng, segment, segment_length, len(item), end_limit)
    layout.write(item_start, item)
    return layout, item_start, segment


def random_string(rng, alphabet: str, length: int) -> str:
    return "".join(alphabet[i] for i in rng.integers(len(alphabet), size=length))


def to_dataset(columns: dict):
    """`datasets.Dataset` from per-example columns (token arrays become lists of ints)."""
    from datasets import Dataset

    return Dataset.from_dict(columns)
