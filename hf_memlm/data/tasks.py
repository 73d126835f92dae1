"""Synthetic long-context tasks, generated offline from a seed: passkey retrieval, associative recall, copy.

Every example is exactly `num_segments * segment_length` tokens (no padding), `labels` are -100 except on the
tokens the model must produce, and the question with its answer always lies in the last segment. Whatever is asked
for is written earlier inside one segment, never split by a segment boundary.

Columns shared by all tasks:
    input_ids, labels        token ids; labels == input_ids on the reply, -100 elsewhere (the model shifts). The
                             reply is the answer; for passkey it also holds the space before the key and the
                             end-of-text marker after it, which the model learns to produce but which are not
                             part of the answer (the evaluation scores the answer alone)
    answer                   the expected text; decode(input_ids[answer_start : answer_start + answer_length])
                             gives it (for passkey with a BPE tokenizer, with a leading space: `.strip()` it)
    answer_start             position of the first answer token (generate from input_ids[:answer_start])
    answer_length            number of answer tokens
    written_start            position where the same tokens were written earlier (the needle's key, the pair's
                             value, the source string): input_ids there equal the answer tokens
    distance_tokens          answer_start - written_start
    distance_segments        answer_start // segment_length - written_start // segment_length
                             (0: the answer is inside the model's window; memory is needed when it is >= 1)
For `make_recall_dataset` (several answers per example) these six columns hold one list entry per query, in the
order the queries appear.
"""

from __future__ import annotations

import string

import numpy as np

from .layout import (
    ExampleLayout,
    FillerStream,
    book_number,
    check_counts,
    check_positive_int,
    encode,
    place_before_question,
    random_start_in_segment,
    random_string,
    resolve_segments,
    to_dataset,
)

PASSKEY_NEEDLE_PREFIX = " The pass key is"  # + " 48213"
PASSKEY_NEEDLE_SUFFIX = ". Remember it. "
PASSKEY_QUESTION = " What is the pass key? The pass key is"  # + " 48213<eos>" (the labelled reply)
QUESTION_POSITIONS = ("end", "random")
NUMBERS_WHERE = ("all", "with_distractors")  # which examples get book numbers
RECALL_KEY_END = ":"  # a pair is " <key>:<value>", a query the same with the loss on <value>
# Single-character recall keys for `key_length=1, separator=""`: every printable ASCII character but the digits (the
# default values) and the space (which opens a pair). With a byte tokenizer each key is one token right before its
# value, so a memory that stores "token j -> token j+1" can address a pair without first learning a key's context.
RECALL_SINGLE_TOKEN_KEYS = "".join(c for c in string.printable[:94] if not c.isdigit())
COPY_OPEN, COPY_CLOSE = " [", "] "  # the source string, written early
COPY_QUESTION = " Copy: ["  # + the string again (the labelled answer)

SHARED_COLUMNS = ("answer", "answer_start", "answer_length", "written_start", "distance_tokens", "distance_segments")


def _check_sizes(num_examples, segment_length, num_segments) -> None:
    check_positive_int("num_examples", num_examples)
    check_positive_int("segment_length", segment_length)
    check_positive_int("num_segments", num_segments)


def _answer_columns(answer: str, answer_start: int, answer_length: int, written_start: int, segment_length: int):
    return {
        "answer": answer,
        "answer_start": answer_start,
        "answer_length": answer_length,
        "written_start": written_start,
        "distance_tokens": answer_start - written_start,
        "distance_segments": answer_start // segment_length - written_start // segment_length,
    }


def make_passkey_dataset(
    tokenizer,
    num_examples: int,
    segment_length: int,
    num_segments: int,
    needle_segment=None,
    filler: str = "natural",
    seed: int = 0,
    text: str | None = None,
    key_digits: int = 5,
    end_marker: bool = True,
    question_position: str = "end",
    distractors: int | list[int] = 0,
    distractor_prefixes: list[str] | None = None,
    numbers: int | list[int] = 0,
    numbers_where: str = "all",
):
    """Passkey retrieval: "The pass key is 48213. Remember it." hidden in filler, asked for in the last segment.

    Args:
        needle_segment: segment holding the needle: an int (0 = first), a list of ints to draw from per example,
            or None for a random segment before the last. The last segment (`num_segments - 1`) is allowed when
            the needle and the question both fit in it (an in-window control).
        filler: `"natural"` (consecutive text of `text`, default the bundled book excerpt, from a random offset)
            or `"synthetic"` (repeated "The grass is green. ..." sentences).
        key_digits: digits of the random key (no leading zero).
        end_marker: put the tokenizer's end-of-text token (`eos_token`) after the key in the reply, so that a
            trained model ends its answer with it and `generate` stops there. Needs a tokenizer with an eos token.
        distractors: other numbers of `key_digits` digits (" 73190") written over the filler at random free places,
            as many per example. With digits in the memory that are not the key, a model can only answer by
            telling the key from other numbers by its context ("The pass key is ..."), which is what keeps it
            right when the memory holds a whole book of text with numbers in it. A list of counts is drawn from per
            example (`[0, 3, 3, 3]`: a quarter of the examples without distractors, which keeps the read learnable
            from its random start, see `configs/passkey_1m_cpu.yaml`).
        distractor_prefixes: phrases that introduce the distractors, one drawn per distractor (e.g.
            `[" The room number is", " The year was"]`: " The room number is 73190."); default: bare numbers.
            Numbers introduced like the key make the model tell the key by "pass key", not by "is".
        numbers: numbers as books hold them (" CHAPTER 83.", " in the year 1839."), of 1 to `key_digits` digits,
            half of them starting with one of the key's digits, written over the filler at random free places; a
            count, or a list of counts to draw one from per example. A book's own numbers are what a key read back
            from a million tokens of it gets its wrong digits from.
        numbers_where: `"all"` examples, or only those `"with_distractors"`: then the examples drawn without
            distractors hold the key alone among the filler's digits, the plain examples a read learns from at
            its random start (see `configs/passkey_1m_cpu.yaml`).
        question_position: `"end"`: the question and its reply end the example (the last tokens of the last
            segment). `"random"`: they start at a random position of the last segment (after the needle when
            the needle is there too), filler after them; from the first position of a segment (as a prompt
            after a document read into memory is) to its end. Train with `"random"` for a model that answers
            wherever the question is asked.

    The question reads "... What is the pass key? The pass key is" and the labelled reply is " 48213<eos>": the
    space before the key (a token of its own for a byte tokenizer, merged into the number by a BPE: "Ġ48213"), the
    key, and the end marker. `answer_start` / `answer_length` mark the key alone, which is what the evaluation's
    exact match scores. Extra columns: `needle_start` (first needle token), `needle_segment`, `question_start`.
    """
    _check_sizes(num_examples, segment_length, num_segments)
    if isinstance(key_digits, bool) or not isinstance(key_digits, int) or not 1 <= key_digits <= 18:
        raise ValueError(f"key_digits must be an integer from 1 to 18, got {key_digits!r}.")
    if question_position not in QUESTION_POSITIONS:
        raise ValueError(
            f"make_passkey_dataset: question_position={question_position!r} is unknown; choose one of "
            f"{QUESTION_POSITIONS}."
        )
    distractor_counts = check_counts("make_passkey_dataset", "distractors", distractors)
    number_counts = check_counts("make_passkey_dataset", "numbers", numbers)
    if numbers_where not in NUMBERS_WHERE:
        raise ValueError(
            f"make_passkey_dataset: numbers_where={numbers_where!r} is unknown; choose one of {NUMBERS_WHERE}."
        )
    prefixes = [""] if distractor_prefixes is None else distractor_prefixes
    if distractor_prefixes is not None and (
        isinstance(prefixes, str) or not prefixes or not all(isinstance(p, str) and p for p in prefixes)
    ):
        raise ValueError(
            "make_passkey_dataset: distractor_prefixes must be a non-empty list of non-empty phrases, got "
            f"{distractor_prefixes!r}."
        )
    marker = _end_marker(tokenizer, end_marker)
    segment_choices = resolve_segments(needle_segment, num_segments, "needle_segment")
    filler_stream = FillerStream(tokenizer, filler, text)
    prefix, suffix = encode(tokenizer, PASSKEY_NEEDLE_PREFIX), encode(tokenizer, PASSKEY_NEEDLE_SUFFIX)
    question = encode(tokenizer, PASSKEY_QUESTION)
    total = segment_length * num_segments
    rng = np.random.default_rng(seed)

    rows = []
    for _ in range(num_examples):
        key = str(int(rng.integers(10 ** (key_digits - 1), 10**key_digits)))
        space, key_ids = _split_leading_space(tokenizer, key)
        needle = np.concatenate([prefix, space, key_ids, suffix])
        reply = np.concatenate([space, key_ids, marker])
        question_and_answer = len(question) + len(reply)
        if question_and_answer > segment_length:
            raise ValueError(
                f"make_passkey_dataset: the question and answer take {question_and_answer} tokens but "
                f"segment_length={segment_length}; they must fit in the last segment. Use a longer segment_length."
            )
        if len(needle) > segment_length:
            raise ValueError(
                f"make_passkey_dataset: the needle takes {len(needle)} tokens but segment_length={segment_length}; "
                "it must fit inside one segment. Use a longer segment_length."
            )
        layout, needle_start, segment = place_before_question(
            rng,
            filler_stream,
            segment_choices=segment_choices,
            num_segments=num_segments,
            segment_length=segment_length,
            item=needle,
            question_and_answer=question_and_answer,
            names=("make_passkey_dataset", "needle_segment", "needle", "question and answer"),
        )
        question_start = total - question_and_answer
        if question_position == "random":
            earliest = (num_segments - 1) * segment_length
            if segment == num_segments - 1:
                earliest = needle_start + len(needle)  # the needle shares the last segment: ask after it
            question_start = int(rng.integers(earliest, question_start + 1))
        reply_start = layout.write(question_start, question)
        layout.write_answer(reply_start, reply)
        # A list is drawn from only when given, so that a fixed count keeps the examples of earlier releases
        count = distractors if distractor_counts is None else int(rng.choice(distractor_counts))
        for _ in range(count):
            number = str(int(rng.integers(10 ** (key_digits - 1), 10**key_digits)))
            prefix_text = prefixes[int(rng.integers(len(prefixes)))]
            layout.write_somewhere_free(rng, encode(tokenizer, f"{prefix_text} {number}{'.' if prefix_text else ''}"))
        book_numbers = numbers if number_counts is None else int(rng.choice(number_counts))
        for _ in range(book_numbers if count or numbers_where == "all" else 0):
            layout.write_somewhere_free(rng, encode(tokenizer, book_number(rng, key, key_digits)))
        answer_start = reply_start + len(space)
        row = {"input_ids": layout.tokens, "labels": layout.labels}
        key_start = needle_start + len(prefix) + len(space)
        row.update(_answer_columns(key, answer_start, len(key_ids), key_start, segment_length))
        row.update(needle_start=needle_start, needle_segment=segment, question_start=question_start)
        rows.append(row)
    return to_dataset({name: [row[name] for row in rows] for name in rows[0]})


def _end_marker(tokenizer, wanted) -> np.ndarray:
    """The end-of-text token ids that close a reply (none when `wanted` is False)."""
    if not isinstance(wanted, bool):
        raise ValueError(f"make_passkey_dataset: end_marker must be true or false, got {wanted!r}.")
    if not wanted:
        return np.zeros(0, dtype=np.int64)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "make_passkey_dataset: end_marker=True ends each reply with the tokenizer's end-of-text token, but "
            "this tokenizer has no eos_token; set one (tokenizer.eos_token = ...) or pass end_marker=False."
        )
    return np.asarray([eos], dtype=np.int64)


def _split_leading_space(tokenizer, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(space ids, key ids) of " <key>": the space stays outside the answer when the tokenizer keeps it apart
    (byte tokenizer; it is still labelled, as part of the reply); a BPE that merges it into the key ("Ġ48213")
    keeps it inside."""
    spaced, space, bare = encode(tokenizer, " " + key), encode(tokenizer, " "), encode(tokenizer, key)
    if len(space) and spaced.tolist() == space.tolist() + bare.tolist():
        return space, bare
    return space[:0], spaced


def make_recall_dataset(
    tokenizer,
    num_examples: int,
    segment_length: int,
    num_segments: int,
    num_pairs: int = 8,
    num_queries: int | None = None,
    write_segments: int = 1,
    key_length: int = 2,
    value_length: int = 2,
    key_alphabet: str = string.ascii_lowercase,
    value_alphabet: str = string.digits,
    filler: str = "natural",
    seed: int = 0,
    text: str | None = None,
    separator: str = RECALL_KEY_END,
):
    """Multi-query associative recall stretched over segments (Zoology's MQAR with filler in between).

    `num_pairs` pairs " <key>:<value>" (distinct random keys of `key_length` characters from `key_alphabet`,
    random values of `value_length` characters from `value_alphabet`) are written in the first `write_segments`
    segments, spread evenly and shuffled; each segment's pairs form one block at a random offset. The last segment
    ends with `num_queries` queries (default: all pairs) for a random subset of the keys in random order, each
    " <key>:<value>" with the loss on `<value>`. With `num_segments=1` pairs and queries share the one segment.
    Keys are distinct within an example and drawn afresh (with fresh values) for every example.

    `separator` goes between a key and its value (default ":"). `separator=""` with `key_length=1` and
    `key_alphabet=RECALL_SINGLE_TOKEN_KEYS` writes pairs as " K7": with a byte tokenizer the key is the one token
    before its value, which a memory storing "token j -> token j+1" can address directly (as in Zoology's MQAR,
    where keys and values are single tokens); multi-token keys first need the key's earlier tokens to reach the
    memory layer. Without a separator the key and value alphabets must not share a character.

    The shared columns (see the module docstring) are lists, one entry per query; `answer` holds the values.
    Extra columns: `query_keys` (list of the queried keys) and `num_pairs`.
    """
    _check_sizes(num_examples, segment_length, num_segments)
    check_positive_int("num_pairs", num_pairs)
    check_positive_int("key_length", key_length)
    check_positive_int("value_length", value_length)
    check_positive_int("write_segments", write_segments)
    num_queries = num_pairs if num_queries is None else num_queries
    check_positive_int("num_queries", num_queries)
    if num_queries > num_pairs:
        raise ValueError(f"make_recall_dataset: num_queries={num_queries} is more than num_pairs={num_pairs}.")
    max_write_segments = max(num_segments - 1, 1)
    if write_segments > max_write_segments:
        raise ValueError(
            f"make_recall_dataset: write_segments={write_segments} leaves no later segment for the queries; with "
            f"num_segments={num_segments} it must be at most {max_write_segments}."
        )
    if len(set(key_alphabet)) < len(key_alphabet) or len(set(value_alphabet)) < len(value_alphabet):
        raise ValueError("make_recall_dataset: key_alphabet and value_alphabet must not repeat characters.")
    if not key_alphabet or not value_alphabet:
        raise ValueError("make_recall_dataset: key_alphabet and value_alphabet must not be empty.")
    if not isinstance(separator, str):
        raise ValueError(f"make_recall_dataset: separator must be a string, got {separator!r}.")
    if not separator and set(key_alphabet) & set(value_alphabet):
        raise ValueError(
            f"make_recall_dataset: separator='' needs key_alphabet and value_alphabet without a common character "
            f"(both hold {''.join(sorted(set(key_alphabet) & set(value_alphabet)))!r}), or a pair cannot be read "
            "back; pass disjoint alphabets or a separator such as ':'."
        )
    if len(key_alphabet) ** key_length < num_pairs:
        raise ValueError(
            f"make_recall_dataset: num_pairs={num_pairs} distinct keys are needed but only "
            f"{len(key_alphabet)}**{key_length} = {len(key_alphabet) ** key_length} keys of key_length={key_length} "
            "exist; use a longer key_length or fewer pairs."
        )
    filler_stream = FillerStream(tokenizer, filler, text)
    total = segment_length * num_segments
    rng = np.random.default_rng(seed)

    rows = []
    for _ in range(num_examples):
        keys = _distinct_keys(rng, key_alphabet, key_length, num_pairs)
        values = [random_string(rng, value_alphabet, value_length) for _ in range(num_pairs)]
        key_ids = [encode(tokenizer, " " + key + separator) for key in keys]
        value_ids = [encode(tokenizer, value) for value in values]
        pair_lengths = [len(k) + len(v) for k, v in zip(key_ids, value_ids)]

        queried = rng.choice(num_pairs, size=num_queries, replace=False)
        query_block = sum(pair_lengths[i] for i in queried)
        if query_block > segment_length:
            raise ValueError(
                f"make_recall_dataset: num_queries={num_queries} queries take {query_block} tokens but the last "
                f"segment holds segment_length={segment_length}; use fewer queries or a longer segment_length."
            )
        queries_start = total - query_block
        layout = ExampleLayout(filler_stream.draw(rng, total), segment_length)

        value_positions = {}
        for segment, group in enumerate(np.array_split(rng.permutation(num_pairs), write_segments)):
            block = sum(pair_lengths[i] for i in group)
            shares_last = segment == num_segments - 1  # only when num_segments == 1
            room = (queries_start - segment * segment_length) if shares_last else segment_length
            if block > room:
                per_pair = max(pair_lengths)
                raise ValueError(
                    f"make_recall_dataset: too many recall pairs for the space: num_pairs={num_pairs} pairs of up to "
                    f"{per_pair} tokens need {block} tokens in segment {segment}, which has room for {room}; at most "
                    f"{write_segments * (room // per_pair)} pairs fit in write_segments={write_segments} segment(s) "
                    f"of segment_length={segment_length}. Use fewer pairs, more write_segments or longer segments."
                )
            end_limit = queries_start if shares_last else None
            position = random_start_in_segment(rng, segment, segment_length, block, end_limit)
            for pair in group:
                value_positions[pair] = layout.write(position, key_ids[pair])
                position = layout.write(value_positions[pair], value_ids[pair])

        answers = {name: [] for name in ("query_keys",) + SHARED_COLUMNS}
        position = queries_start
        for pair in queried:
            answer_start = layout.write(position, key_ids[pair])
            position = layout.write_answer(answer_start, value_ids[pair])
            columns = _answer_columns(
                values[pair], answer_start, len(value_ids[pair]), value_positions[pair], segment_length
            )
            for name, value in columns.items():
                answers[name].append(value)
            answers["query_keys"].append(keys[pair])
        rows.append({"input_ids": layout.tokens, "labels": layout.labels, **answers, "num_pairs": num_pairs})
    return to_dataset({name: [row[name] for row in rows] for name in rows[0]})


def _distinct_keys(rng, alphabet: str, length: int, count: int) -> list[str]:
    space = len(alphabet) ** length
    if space <= 1_000_000:  # small key space: draw indices without replacement, then spell them
        indices = rng.choice(space, size=count, replace=False)
        return [
            "".join(alphabet[(int(i) // len(alphabet) ** p) % len(alphabet)] for p in range(length)) for i in indices
        ]
    keys: list[str] = []
    seen: set[str] = set()
    while len(keys) < count:  # large space: collisions are rare
        key = random_string(rng, alphabet, length)
        if key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def make_copy_dataset(
    tokenizer,
    num_examples: int,
    segment_length: int,
    num_segments: int,
    copy_length: int = 16,
    source_segment=0,
    alphabet: str = string.ascii_lowercase + string.digits,
    filler: str = "natural",
    seed: int = 0,
    text: str | None = None,
):
    """Copy: a random string written early as " [<string>] ", reproduced at the end after " Copy: [".

    Args:
        copy_length: characters of the random string (drawn from `alphabet`); with the byte tokenizer also its
            number of tokens. The copy and its delimiter must fit in one segment.
        source_segment: segment holding the source string: an int, a list to draw from, or None for a random
            segment before the last.

    Labels are on the reproduced string, which ends the example. Extra columns: `source_segment`, `copy_length`.
    """
    _check_sizes(num_examples, segment_length, num_segments)
    check_positive_int("copy_length", copy_length)
    if not alphabet:
        raise ValueError("make_copy_dataset: alphabet must not be empty.")
    segment_choices = resolve_segments(source_segment, num_segments, "source_segment")
    filler_stream = FillerStream(tokenizer, filler, text)
    opening, closing = encode(tokenizer, COPY_OPEN), encode(tokenizer, COPY_CLOSE)
    question = encode(tokenizer, COPY_QUESTION)
    total = segment_length * num_segments
    rng = np.random.default_rng(seed)

    rows = []
    for _ in range(num_examples):
        copied = random_string(rng, alphabet, copy_length)
        copied_ids = encode(tokenizer, copied)
        source = np.concatenate([opening, copied_ids, closing])
        question_and_answer = len(question) + len(copied_ids)
        if max(question_and_answer, len(source)) > segment_length:
            raise ValueError(
                f"make_copy_dataset: copy_length={copy_length} is too long: the string with its delimiters takes "
                f"{max(question_and_answer, len(source))} tokens but segment_length={segment_length}; the source "
                "and the copy must each fit inside one segment. Use a shorter copy_length or longer segments."
            )
        layout, source_start, segment = place_before_question(
            rng,
            filler_stream,
            segment_choices=segment_choices,
            num_segments=num_segments,
            segment_length=segment_length,
            item=source,
            question_and_answer=question_and_answer,
            names=("make_copy_dataset", "source_segment", "source", "copy"),
        )
        answer_start = layout.write(total - question_and_answer, question)
        layout.write_answer(answer_start, copied_ids)
        row = {"input_ids": layout.tokens, "labels": layout.labels}
        row.update(_answer_columns(copied, answer_start, len(copied_ids), source_start + len(opening), segment_length))
        row.update(source_segment=segment, copy_length=copy_length)
        rows.append(row)
    return to_dataset({name: [row[name] for row in rows] for name in rows[0]})


TASK_BUILDERS = {"passkey": make_passkey_dataset, "recall": make_recall_dataset, "copy": make_copy_dataset}
