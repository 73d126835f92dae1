"""Evaluation data for the retrieval tasks: a grid of lengths, generated with the data API from a seed."""

from __future__ import annotations

import inspect


def retrieval_dataset(task, tokenizer, num_examples, segment_length, num_segments: list[int], seed, options=None):
    """`num_examples` examples per length in `num_segments` (seed + i for the i-th length), concatenated.

    Raises ValueError naming the task, the lengths and the options when the generator rejects them.
    """
    from datasets import concatenate_datasets

    from hf_memlm import data

    options = dict(options or {})
    make = data.TASK_BUILDERS[task]
    parts = []
    for number, segments in enumerate(num_segments):
        try:
            parts.append(
                make(
                    tokenizer,
                    num_examples=num_examples,
                    segment_length=segment_length,
                    num_segments=segments,
                    seed=seed + number,
                    **options,
                )
            )
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"cannot generate the {task} data ({segments} segments of {segment_length}) "
                f"with options {options}: {error}"
            ) from error
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def answer_alphabet(task, options) -> str | tuple[str, ...] | None:
    """What the answers are drawn from (the generator's option or its default), for the chance level: the
    characters of recall values and copy strings (a str), or the places of the update task, whole answers
    each (a tuple of str). None for a task without one (passkey: chance comes from the key's digits)."""
    from hf_memlm import data

    name = {"recall": "value_alphabet", "copy": "alphabet", "update": "places"}.get(task)
    if name is None:
        return None
    value = (options or {}).get(name, inspect.signature(data.TASK_BUILDERS[task]).parameters[name].default)
    return str(value) if name != "places" else tuple(str(place) for place in value)
