"""Fact updates: entities change state over the stream; the question asks for the latest state.

    "... Mary is in the kitchen. ... (segments later) ... Mary is in the garden. ... Where is Mary? Mary is
    in the garden"

A memory that only accumulates answers with whatever it stored first or most often; the right answer needs
the newest fact to replace the older ones. Same column conventions as `hf_memlm.data.tasks`.
"""

from __future__ import annotations

import numpy as np

from .layout import ExampleLayout, FillerStream, check_positive_int, encode, random_start_in_segment, to_dataset
from .tasks import _answer_columns, _check_sizes, _split_leading_space

UPDATE_ENTITIES = ("Mary", "John", "Sandra", "Daniel", "Alice", "Peter", "Emma", "Oliver")
UPDATE_PLACES = ("kitchen", "garden", "office", "hallway", "bedroom", "bathroom", "cellar", "library")
UPDATE_STATEMENT = " {entity} is in the"  # + " kitchen" + "."; the question repeats these words
UPDATE_QUESTION = " Where is {entity}? {entity} is in the"  # + " garden" (the labelled answer)


def make_update_dataset(
    tokenizer,
    num_examples: int,
    segment_length: int,
    num_segments: int,
    num_entities: int = 3,
    min_updates: int = 2,
    max_updates: int = 5,
    entities=UPDATE_ENTITIES,
    places=UPDATE_PLACES,
    filler: str = "natural",
    seed: int = 0,
    text: str | None = None,
):
    """Fact updates: `num_entities` people each move `min_updates`..`max_updates` times ("Mary is in the
    kitchen."), the moves spread over the segments before the last in stream order; the last segment ends with
    " Where is Mary? Mary is in the garden" for one of them, the loss on the latest place only.

    Each move goes to a place other than the person's current one, so every move changes the answer. Moves are
    interleaved at random between people; the moves that land in one segment form one block at a random
    offset inside it (never split by a segment boundary).

    Extra columns: `entity` (who is asked about), `num_updates` (how many moves that person made),
    `stale_answers` (their earlier places, oldest first) and `update_segments` (the segment of each move).
    The distance columns measure from the latest move (`written_start` is its place name).
    """
    _check_sizes(num_examples, segment_length, num_segments)
    check_positive_int("num_entities", num_entities)
    check_positive_int("min_updates", min_updates)
    check_positive_int("max_updates", max_updates)
    if min_updates > max_updates:
        raise ValueError(f"make_update_dataset: min_updates={min_updates} is more than max_updates={max_updates}.")
    entities, places = list(entities), list(places)
    if len(set(entities)) != len(entities) or len(set(places)) != len(places):
        raise ValueError("make_update_dataset: entities and places must not repeat names.")
    if num_entities > len(entities):
        raise ValueError(
            f"make_update_dataset: num_entities={num_entities} but only {len(entities)} entities are given; "
            "pass more names in entities= or ask for fewer."
        )
    if len(places) < 2:
        raise ValueError("make_update_dataset: at least 2 places are needed so that a move changes the answer.")
    if num_segments < 2:
        raise ValueError(
            f"make_update_dataset: num_segments={num_segments}; the moves need at least one segment before the "
            "last one (which holds the question). Use num_segments >= 2."
        )
    filler_stream = FillerStream(tokenizer, filler, text)
    total = segment_length * num_segments
    write_segments = num_segments - 1
    rng = np.random.default_rng(seed)
    longest = max(
        len(encode(tokenizer, UPDATE_STATEMENT.format(entity=entity) + " " + place + "."))
        for entity in entities
        for place in places
    )
    per_segment = segment_length // longest
    if per_segment == 0:
        raise ValueError(
            f"make_update_dataset: a statement takes up to {longest} tokens but segment_length={segment_length}; "
            "each must fit inside one segment. Use a longer segment_length or shorter names."
        )

    rows = []
    for _ in range(num_examples):
        people = [entities[i] for i in rng.choice(len(entities), size=num_entities, replace=False)]
        counts = rng.integers(min_updates, max_updates + 1, size=num_entities)
        histories = []
        for count in counts:  # each move changes the place
            history = [places[int(rng.integers(len(places)))]]
            while len(history) < count:
                choices = [p for p in places if p != history[-1]]
                history.append(choices[int(rng.integers(len(choices)))])
            histories.append(history)
        # a random interleaving of the people's moves that keeps each person's moves in order, over segments
        # with room for `per_segment` statements each
        order = rng.permutation(np.repeat(np.arange(num_entities), counts))
        if len(order) > per_segment * write_segments:
            raise ValueError(
                f"make_update_dataset: {len(order)} moves do not fit: a segment of {segment_length} tokens holds "
                f"{per_segment} statement(s) of up to {longest} tokens, and {write_segments} segment(s) come before "
                "the question. Use more segments, longer segments, or fewer entities/updates."
            )
        room = np.repeat(np.arange(write_segments), per_segment)
        segments = np.sort(rng.choice(room, size=len(order), replace=False))
        made = [0] * num_entities
        moves = []  # (person index, place, segment) in stream order
        for person, segment in zip(order, segments):
            moves.append((int(person), histories[person][made[person]], int(segment)))
            made[person] += 1

        asked = int(rng.integers(num_entities))
        question = encode(tokenizer, UPDATE_QUESTION.format(entity=people[asked]))
        space, answer_ids = _split_leading_space(tokenizer, histories[asked][-1])
        question_and_answer = len(question) + len(space) + len(answer_ids)
        if question_and_answer > segment_length:
            raise ValueError(
                f"make_update_dataset: the question and answer take {question_and_answer} tokens but "
                f"segment_length={segment_length}; they must fit in the last segment. Use a longer segment_length."
            )

        layout = ExampleLayout(filler_stream.draw(rng, total), segment_length)
        place_starts = {}  # index of the move -> position of its place name
        for segment in range(write_segments):
            in_segment = [i for i, move in enumerate(moves) if move[2] == segment]
            if not in_segment:
                continue
            pieces = []
            for i in in_segment:
                person, place, _ = moves[i]
                head = encode(tokenizer, UPDATE_STATEMENT.format(entity=people[person]))
                place_space, place_ids = _split_leading_space(tokenizer, place)
                pieces.append((i, np.concatenate([head, place_space]), place_ids, encode(tokenizer, ".")))
            block = sum(len(h) + len(p) + len(d) for _, h, p, d in pieces)
            position = random_start_in_segment(rng, segment, segment_length, block)
            for i, head, place_ids, dot in pieces:
                place_starts[i] = layout.write(position, head)
                position = layout.write(layout.write(place_starts[i], place_ids), dot)

        answer_start = layout.write(total - question_and_answer, np.concatenate([question, space]))
        layout.write_answer(answer_start, answer_ids)
        own_moves = [i for i, move in enumerate(moves) if move[0] == asked]
        row = {"input_ids": layout.tokens, "labels": layout.labels}
        latest = place_starts[own_moves[-1]]
        row.update(_answer_columns(histories[asked][-1], answer_start, len(answer_ids), latest, segment_length))
        row.update(
            entity=people[asked],
            num_updates=len(own_moves),
            stale_answers=histories[asked][:-1],
            update_segments=[moves[i][2] for i in own_moves],
        )
        rows.append(row)
    return to_dataset({name: [row[name] for row in rows] for name in rows[0]})


__all__ = ["UPDATE_ENTITIES", "UPDATE_PLACES", "make_update_dataset"]
