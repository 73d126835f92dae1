"""Pass keys asked the way a user asks an instruct model: a document is read into memory, then a chat question
comes in a fresh call (a new segment, positions from 0) and the model answers in its own words.

    document  ... The pass key of the blue door is 48213. Remember it. ...   (num_segments - 1 whole segments)
    question  <chat template>user: What is the pass key of the blue door?   (the last segment, from its start)
              assistant: The pass key of the blue door is 48213.<end of turn>   (the labelled reply)

A needle is named ("of the blue door") or plain ("The pass key is 48213."). Several named needles of the same
form may share a document, one of them asked for; plain documents may hold other 5-digit numbers (distractors).
The model must then tell the key by its context, not by being the only number around. Books hold numbers of
their own ("CHAPTER 83.", "in the year 1839"): `numbers` writes such numbers over any document, half of them
starting with one of the key's digits, so that a digit of the key is not the only one followed by another.

Columns: input_ids, labels (the reply only), answer (the key), key_name ("" for a plain needle),
needle_segment, question_start (first token of the question segment = (num_segments - 1) * segment_length),
prompt_length (tokens of the question up to the reply), num_needles, and read_targets: at the reply's token before
each of the key's tokens, the column of that token in the asked needle (the memory entry a read there should bring
back; -100 elsewhere), for `MemLMTrainer`'s read loss.
"""

from __future__ import annotations

import numpy as np

from .layout import IGNORE_INDEX, FillerStream, book_number, check_counts, check_positive_int, encode, to_dataset

COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "purple", "orange", "grey", "golden", "silver")
THINGS = ("door", "box", "gate", "chest", "safe", "locker", "cellar", "tower", "garden", "study", "cabin", "vault")


def needle_text(key: str, name: str = "") -> str:
    """ " The pass key of the blue door is 48213. Remember it." (`name` "blue door"), or the plain needle."""
    subject = f"The pass key of the {name}" if name else "The pass key"
    return f" {subject} is {key}. Remember it."


def question_text(name: str = "") -> str:
    return f"What is the pass key of the {name}?" if name else "What is the pass key?"


def reply_text(key: str, name: str = "") -> str:
    return needle_text(key, name).strip().removesuffix(" Remember it.")


def chat_prompt_ids(tokenizer, name: str = "") -> list[int]:
    """The question as the tokenizer's chat template writes a user turn, ending where the assistant replies."""
    messages = [{"role": "user", "content": question_text(name)}]
    return _template_ids(tokenizer, messages, add_generation_prompt=True)


def chat_exchange_ids(tokenizer, key: str, name: str = "") -> tuple[list[int], int]:
    """The question and the assistant's reply ending its turn, as the chat template writes them; and where the
    reply starts (the prompt's length)."""
    return chat_turn_ids(tokenizer, question_text(name), reply_text(key, name))


def chat_turn_ids(tokenizer, question: str, reply: str) -> tuple[list[int], int]:
    """A user turn `question` and the assistant's `reply` ending its turn, as the chat template writes them; and
    where the reply starts (the prompt's length)."""
    prompt = _template_ids(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    whole = _template_ids(tokenizer, messages, add_generation_prompt=False)
    if whole[: len(prompt)] != prompt:
        raise ValueError(
            "the tokenizer's chat template writes the prompt differently once the reply is added; chat passkey "
            "examples need a template whose prompt is a prefix of the whole exchange."
        )
    end = _turn_end(tokenizer, whole, len(prompt))
    return whole[:end], len(prompt)


def _template_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "chat examples (chat_passkey, chat_suite) need a tokenizer with a chat template (an instruct model's "
            "tokenizer); this one has none. Use the passkey task for plain-text questions."
        )
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _turn_end(tokenizer, ids: list[int], reply_start: int) -> int:
    """The end of the reply: just after the first end-of-text token after the reply's start (templates may add
    a newline after it, which is not part of what the model must say)."""
    eos = tokenizer.eos_token_id
    for position in range(reply_start, len(ids)):
        if ids[position] == eos:
            return position + 1
    return len(ids)


def draw_key(rng, digits: int = 5) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def draw_names(rng, count: int) -> list[str]:
    """`count` distinct names such as "blue door"."""
    pairs = rng.permutation(len(COLORS) * len(THINGS))[:count]
    return [f"{COLORS[p // len(THINGS)]} {THINGS[p % len(THINGS)]}" for p in pairs]


def make_chat_passkey_dataset(
    tokenizer,
    num_examples: int,
    segment_length: int,
    num_segments: int,
    seed: int = 0,
    text: str | None = None,
    filler: str = "natural",
    named_share: float = 0.5,
    max_needles: int = 4,
    min_needles: int = 1,
    distractors: int = 2,
    key_digits: int = 5,
    numbers: int | list[int] = 0,
):
    """Chat passkey examples: `num_segments - 1` segments of document, then the chat question and reply.

    Args:
        text / filler: the document's text (`FillerStream`: default the bundled excerpt; "synthetic" filler).
        named_share: share of examples whose needles are named ("the pass key of the blue door"); the others
            hold one plain needle.
        max_needles / min_needles: a named example holds `min_needles` to `max_needles` needles (distinct names,
            distinct keys), each in its own segment where the document has enough; one of them is asked for. Only
            examples with several needles teach the read to tell the asked name's key from the others'.
        distractors: other numbers of `key_digits` digits written over the filler of plain examples.
        numbers: numbers of 1 to `key_digits` digits written over the filler of every example, each after a phrase
            such as " CHAPTER" or " in the year" and half of them starting with one of the key's digits; a count,
            or a list of counts to draw one from per example.
    """
    check_positive_int("num_examples", num_examples)
    check_positive_int("segment_length", segment_length)
    check_positive_int("max_needles", max_needles)
    check_positive_int("min_needles", min_needles)
    if min_needles > max_needles:
        raise ValueError(f"min_needles ({min_needles}) must not exceed max_needles ({max_needles}).")
    check_chat_segments(num_segments)
    if not 0.0 <= named_share <= 1.0:
        raise ValueError(f"named_share must lie in [0, 1], got {named_share!r}.")
    if isinstance(distractors, bool) or not isinstance(distractors, int) or distractors < 0:
        raise ValueError(f"distractors must be a non-negative integer, got {distractors!r}.")
    number_counts = check_counts("make_chat_passkey_dataset", "numbers", numbers)
    rng = np.random.default_rng(seed)
    stream = FillerStream(tokenizer, filler, text)
    document_length = (num_segments - 1) * segment_length
    rows = []
    for _ in range(num_examples):
        named = bool(rng.random() < named_share)
        count = int(rng.integers(min_needles, max_needles + 1)) if named else 1
        names = draw_names(rng, count) if named else [""]
        keys = []
        while len(keys) < count:
            key = draw_key(rng, key_digits)
            keys.append(key) if key not in keys else None
        document = stream.draw(rng, document_length)
        taken = np.zeros(document_length, dtype=bool)
        segments = rng.permutation(num_segments - 1)
        needle_segments, needle_starts = [], []
        for number, (key, name) in enumerate(zip(keys, names)):
            ids = encode(tokenizer, needle_text(key, name))
            segment = int(segments[number % len(segments)])
            start = _free_start(rng, taken, segment * segment_length, segment_length, len(ids))
            if start is None:
                raise ValueError(
                    f"{count} needles of {len(ids)} tokens do not fit in {num_segments - 1} segments of "
                    f"{segment_length}: use a longer segment_length, more segments or fewer max_needles."
                )
            document[start : start + len(ids)] = ids
            taken[start : start + len(ids)] = True
            needle_segments.append(segment)
            needle_starts.append(start)
        if not named:
            for _ in range(distractors):
                _write_where_free(rng, document, taken, encode(tokenizer, f" {draw_key(rng, key_digits)}"))
        asked = int(rng.integers(count))
        for _ in range(numbers if number_counts is None else int(rng.choice(number_counts))):
            _write_where_free(rng, document, taken, encode(tokenizer, book_number(rng, keys[asked], key_digits)))
        exchange, prompt_length = chat_exchange_ids(tokenizer, keys[asked], names[asked])
        columns = document_then_question(document, exchange, prompt_length, segment_length)
        needle = encode(tokenizer, needle_text(keys[asked], names[asked]))
        reply_start = len(document) + prompt_length
        columns["read_targets"] = key_read_targets(
            tokenizer,
            keys[asked],
            needle,
            needle_starts[asked],
            exchange[prompt_length:],
            reply_start,
            len(columns["input_ids"]),
        )
        rows.append(
            {
                **columns,
                "answer": keys[asked],
                "key_name": names[asked],
                "needle_segment": needle_segments[asked],
                "num_needles": count,
            }
        )
    return to_dataset({name: [row[name] for row in rows] for name in rows[0]})


def key_read_targets(
    tokenizer, key: str, needle, needle_start: int, reply, reply_start: int, length: int
) -> np.ndarray:
    """`read_targets` of one example of `length` tokens: at the reply's token before each token of `key`, the column
    of that key token in the needle (the needle's tokens start at `needle_start`, the reply's at `reply_start`);
    -100 elsewhere. All -100 where the key is not written with the same tokens in both (nothing to point at)."""
    targets = np.full(length, IGNORE_INDEX, dtype=np.int64)
    in_needle, in_reply = key_tokens(tokenizer, needle, key), key_tokens(tokenizer, reply, key)
    if in_needle is None or in_reply is None:
        return targets
    (needle_first, needle_end), (reply_first, reply_end) = in_needle, in_reply
    if list(needle[needle_first:needle_end]) != list(reply[reply_first:reply_end]) or reply_first == 0:
        return targets
    count = needle_end - needle_first
    targets[reply_start + reply_first - 1 : reply_start + reply_first - 1 + count] = np.arange(count) + (
        needle_start + needle_first
    )
    return targets


def key_tokens(tokenizer, ids, key: str) -> tuple[int, int] | None:
    """The first run of `ids` whose text is `key` (spaces around it aside), as (first, end), or None."""
    pieces = [tokenizer.decode([int(token)]) for token in ids]
    for first, piece in enumerate(pieces):
        if not piece.strip() or not key.startswith(piece.strip()):
            continue
        text = ""
        for end in range(first, len(pieces)):
            text += pieces[end]
            if text.strip() == key:
                return first, end + 1
            if not key.startswith(text.strip()):
                break
    return None


def check_chat_segments(num_segments) -> None:
    """A chat example needs at least one segment of document and the question's own."""
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 2:
        raise ValueError(f"num_segments must be at least 2 (a document and the question), got {num_segments!r}.")


def document_then_question(document: np.ndarray, exchange: list[int], prompt_length: int, segment_length: int) -> dict:
    """A training example's columns: the document's tokens, then the chat exchange from a segment start (it must fit
    in that one segment), only the reply labelled: input_ids, labels, question_start, prompt_length."""
    if len(exchange) > segment_length:
        raise ValueError(
            f"the chat question and reply take {len(exchange)} tokens but segment_length={segment_length}: they "
            "must fit in the last segment. Use a longer segment_length."
        )
    labels = np.full(len(document) + len(exchange), IGNORE_INDEX, dtype=np.int64)
    labels[len(document) + prompt_length :] = exchange[prompt_length:]
    return {
        "input_ids": np.concatenate([document, np.asarray(exchange, dtype=np.int64)]),
        "labels": labels,
        "question_start": len(document),
        "prompt_length": prompt_length,
    }


def _write_where_free(rng, document: np.ndarray, taken: np.ndarray, ids: np.ndarray) -> None:
    """Write `ids` over `document` at a random place none of whose tokens is taken (nowhere if there is none)."""
    start = _free_start(rng, taken, 0, len(document), len(ids))
    if start is not None:
        document[start : start + len(ids)] = ids
        taken[start : start + len(ids)] = True


def _free_start(rng, taken: np.ndarray, first: int, span: int, length: int) -> int | None:
    """A random start in [first, first + span - length] whose `length` tokens are all free, or None."""
    window = taken[first : first + span].astype(np.int64)
    if len(window) < length:
        return None
    busy = np.convolve(window, np.ones(length, dtype=np.int64), mode="valid")  # taken tokens per placement
    free = np.flatnonzero(busy == 0)
    return None if len(free) == 0 else first + int(free[int(rng.integers(len(free)))])


__all__ = [
    "chat_exchange_ids",
    "chat_prompt_ids",
    "draw_key",
    "draw_names",
    "make_chat_passkey_dataset",
    "needle_text",
    "question_text",
    "reply_text",
]
