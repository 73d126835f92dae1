"""Retrieval accuracy (passkey, associative recall, copy) by distance, teacher-forced, with baselines.

An *answer* is one span of the dataset's `answer_start` / `answer_length` (or, without those columns, one
run of labelled tokens, `labels != -100`): the key of a passkey example, one queried value of a recall
example, the copied string of a copy example. An answer is right (exact match) when every one
of its tokens is the argmax prediction given the true tokens before it. For a greedy decoder this is the same as exact match of the generated answer: if every token is the
argmax given the true prefix, greedy decoding from the prompt produces those tokens one by one, and at
the first wrong token it produces something else. (Recall examples with several queries: each answer is
generated from the true text before it.) `check_generate=k` confirms this on k answers by
calling `model.generate`; the core model reads prompts longer than a segment into memory with the same
segment boundaries as a forward, so the two agree up to floating-point ties.

Answers are placed by the dataset's `answer_start` / `answer_length` columns when it has them (as
`hf_memlm.data` makes them; checked against the labels), else by the runs of labelled tokens.
Distances come from the `distance_tokens` / `distance_segments` columns: one number per example
(applied to all its answers) or a list with one number per answer.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .conditions import (
    BASE_MODEL,
    CONDITION_LABELS,
    MEMORY,
    MEMORY_DISABLED,
    base_window_piece,
    base_window_predictions,
    describe_conditions,
    pad_batch,
    shift_labels,
    streamed_predictions,
)

REQUIRED_COLUMNS = ("input_ids", "labels", "distance_tokens", "distance_segments")


def evaluate_retrieval(
    model,
    dataset,
    *,
    batch_size: int = 8,
    baselines: bool = True,
    task: str | None = None,
    distance_bin_tokens: int | None = None,
    check_generate: int = 0,
    answer_alphabet: str | None = None,
    keep_answers: bool = True,
    progress: bool = True,
) -> dict:
    """Teacher-forced retrieval accuracy of a `MemLMForCausalLM` on a generated task dataset.

    dataset: rows with `input_ids`, `labels` (-100 except answer tokens; HF convention, the model shifts),
        `distance_tokens`, `distance_segments`, optionally `attention_mask` and `answer` (text).
    baselines: also score `memory_disabled` and `base_model` (see `conditions.py` for what each sees).
    distance_bin_tokens: width of the token-distance buckets (default: the segment length).
    check_generate: greedy-generate k answers (spread over the dataset) with memory; count agreement with the
        teacher-forced exact match (`results["generate_check"]`).
    answer_alphabet: what the answers are drawn from, for the exact-match chance level: a str of characters
        (e.g. digits for recall values), or a tuple of whole answers (e.g. the update task's places);
        `hf_memlm.evaluation.answer_alphabet(task, options)` gives it for the built-in tasks. Passkey needs none.
    Returns a JSON-ready dict (see `write_report`).
    """
    examples = read_examples(dataset)
    segment_length = model.config.segment_length
    conditions = [MEMORY, MEMORY_DISABLED, BASE_MODEL] if baselines else [MEMORY]
    was_training = model.training
    model.eval()
    try:
        answers = _find_answers(examples)
        for condition in (MEMORY, MEMORY_DISABLED) if baselines else (MEMORY,):
            _score_streamed(model, examples, answers, condition, batch_size, progress)
        if baselines:
            _score_base_windows(model, examples, answers, batch_size, progress)
        generate_check = _check_generate(model, examples, answers, check_generate, progress) if check_generate else None
    finally:
        model.train(was_training)

    for answer in answers:
        answer["correct_tokens"] = {
            c: sum(p == t for p, t in zip(answer["predicted"][c], answer["target"])) for c in conditions
        }
        answer["exact"] = {c: answer["correct_tokens"][c] == answer["length"] for c in conditions}
    bin_tokens = distance_bin_tokens or segment_length
    vocab_size = model.config.get_text_config().vocab_size
    results = {
        "kind": "retrieval",
        "task": task or "retrieval",
        "segment_length": segment_length,
        "num_examples": len(examples),
        "num_answers": len(answers),
        "conditions": conditions,
        "condition_labels": {c: CONDITION_LABELS[c] for c in conditions},
        "condition_descriptions": {c: d for c, d in describe_conditions(segment_length).items() if c in conditions},
        "method": (
            "teacher-forced: an answer is right when every labelled token is the argmax prediction given the "
            "true tokens before it (= exact match of greedy generation of that answer)"
        ),
        "chance": chance_levels(task, answers, vocab_size, answer_alphabet),
        "overall": summarize(answers, conditions),
        "by_distance_segments": bucket_by_segments(answers, conditions),
        "distance_bin_tokens": bin_tokens,
        "by_distance_tokens": bucket_by_tokens(answers, conditions, bin_tokens),
        "model": describe_model(model),
    }
    if generate_check is not None:
        results["generate_check"] = generate_check
    if keep_answers:
        results["answers"] = answers
    return results


# -- reading the dataset --------------------------------------------------------------------------------
def read_examples(dataset) -> list[dict]:
    """Rows as dicts of plain Python values, from a `datasets.Dataset` or a list of dicts."""
    if hasattr(dataset, "column_names"):
        columns = list(dataset.column_names)
        rows = [dict(zip(columns, values)) for values in zip(*(list(dataset[c]) for c in columns))]
    else:
        rows = [dict(row) for row in dataset]
        columns = list(rows[0]) if rows else []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(
            f"the retrieval dataset lacks column(s) {missing} (it has {columns}); it needs input_ids, labels "
            "(-100 except on answer tokens) and distance_tokens / distance_segments per example, as made by "
            "hf_memlm.data.make_passkey_dataset / make_recall_dataset / make_copy_dataset."
        )
    if not rows:
        raise ValueError("the retrieval dataset is empty; generate at least one example.")
    return rows


def answer_spans(labels: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of labelled positions, as (start, end) with end exclusive."""
    spans, start = [], None
    for position, label in enumerate(list(labels) + [-100]):
        if label != -100 and start is None:
            start = position
        elif label == -100 and start is not None:
            spans.append((start, position))
            start = None
    return spans


def _find_answers(examples: list[dict]) -> list[dict]:
    answers = []
    for index, example in enumerate(examples):
        labels = list(example["labels"])
        if len(labels) != len(example["input_ids"]):
            raise ValueError(
                f"example {index}: labels ({len(labels)}) and input_ids ({len(example['input_ids'])}) differ in length."
            )
        spans = _declared_spans(example, labels, index)
        if not spans:
            raise ValueError(f"example {index} has no labelled token (all labels are -100): nothing to score.")
        if spans[0][0] == 0:
            raise ValueError(f"example {index} labels its first token, which no context predicts; label answers only.")
        tokens = _per_answer(example["distance_tokens"], len(spans), index, "distance_tokens")
        segments = _per_answer(example["distance_segments"], len(spans), index, "distance_segments")
        for number, (start, end) in enumerate(spans):
            answers.append(
                {
                    "example": index,
                    "answer_index": number,
                    "start": start,
                    "length": end - start,
                    "distance_tokens": tokens[number],
                    "distance_segments": segments[number],
                    "target": [int(t) for t in labels[start:end]],
                    "answer_text": _answer_text(example.get("answer"), number, len(spans)),
                    "predicted": {},
                    "nll": {},
                }
            )
    return answers


def _declared_spans(example: dict, labels: list[int], index: int) -> list[tuple[int, int]]:
    """Answers as declared by `answer_start` / `answer_length` (hf_memlm.data), checked to be labelled;
    without those columns, the runs of labelled tokens. Labelled tokens outside the declared answers (the
    space before a passkey and the end-of-text marker after it) are what the model learns to produce around
    the answer; they are not scored."""
    runs = answer_spans(labels)
    if example.get("answer_start") is None or example.get("answer_length") is None:
        return runs
    starts, lengths = example["answer_start"], example["answer_length"]
    if not isinstance(starts, (list, tuple)):
        starts, lengths = [starts], [lengths]
    if len(starts) != len(lengths):
        raise ValueError(f"example {index}: answer_start lists {len(starts)} answers but answer_length {len(lengths)}.")
    spans = [(int(start), int(start) + int(length)) for start, length in zip(starts, lengths)]
    declared = sorted(position for start, end in spans for position in range(start, end))
    labelled = {position for start, end in runs for position in range(start, end)}
    unlabelled = [position for position in declared if position not in labelled]
    if unlabelled or len(set(declared)) != len(declared):
        raise ValueError(
            f"example {index}: answer_start/answer_length mark positions {declared[:8]}... but the labels mark "
            f"{sorted(labelled)[:8]}...; every answer token must be labelled, and answers must not overlap."
        )
    return spans


def _per_answer(value, count: int, index: int, name: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"example {index}: {name} lists {len(value)} distances but the labels hold {count} answers "
                "(answer_start entries, or runs of labelled tokens); give one distance per answer or one per example."
            )
        return [int(v) for v in value]
    return [int(value)] * count


def _answer_text(answer, number: int, count: int):
    if isinstance(answer, (list, tuple)):
        return str(answer[number]) if len(answer) == count else None
    return None if answer is None or count != 1 else str(answer)


# -- scoring --------------------------------------------------------------------------------------------
def _score_streamed(model, examples, answers, condition, batch_size, progress) -> None:
    device = next(model.parameters()).device
    by_example = {}
    for answer in answers:
        by_example.setdefault(answer["example"], []).append(answer)
    bar = tqdm(total=len(examples), desc=f"retrieval: {CONDITION_LABELS[condition]}", disable=not progress, unit="ex")
    for first in range(0, len(examples), batch_size):
        chunk = examples[first : first + batch_size]
        ids, mask = pad_batch([e["input_ids"] for e in chunk], 0, device)
        labels, _ = pad_batch([e["labels"] for e in chunk], -100, device)
        if all("attention_mask" in e and e["attention_mask"] is not None for e in chunk):
            given, _ = pad_batch([e["attention_mask"] for e in chunk], 0, device)
            mask = mask * given
        predicted, nll = streamed_predictions(model, ids, mask, shift_labels(labels), use_memory=condition == MEMORY)
        for row in range(len(chunk)):
            for answer in by_example[first + row]:
                # token t is predicted by the logits at t - 1
                positions = slice(answer["start"] - 1, answer["start"] - 1 + answer["length"])
                answer["predicted"][condition] = predicted[row, positions].tolist()
                answer["nll"][condition] = float(nll[row, positions].sum())
        bar.update(len(chunk))
    bar.close()


def _score_base_windows(model, examples, answers, batch_size, progress) -> None:
    """The base model reads the L tokens ending just before each answer piece's last token."""
    segment_length = model.config.segment_length
    piece = base_window_piece(segment_length)
    jobs, owners = [], []
    for answer in answers:
        ids = torch.as_tensor(examples[answer["example"]]["input_ids"], dtype=torch.long)
        for first in range(answer["start"], answer["start"] + answer["length"], piece):
            last = min(first + piece, answer["start"] + answer["length"]) - 1  # last answer token of the piece
            window_start = max(0, last - segment_length)
            window = ids[window_start:last]  # tokens window_start .. last - 1: at most L
            positions = torch.arange(first - 1, last) - window_start
            targets = torch.as_tensor(answer["target"][first - answer["start"] : last + 1 - answer["start"]])
            jobs.append((window, positions, targets))
            owners.append(answer)
    results = []
    bar = tqdm(total=len(jobs), desc=f"retrieval: {CONDITION_LABELS[BASE_MODEL]}", disable=not progress, unit="win")
    for first in range(0, len(jobs), batch_size):
        results.extend(base_window_predictions(model.language_model, jobs[first : first + batch_size], batch_size))
        bar.update(min(batch_size, len(jobs) - first))
    bar.close()
    for answer in answers:
        answer["predicted"][BASE_MODEL], answer["nll"][BASE_MODEL] = [], 0.0
    for answer, (predicted, nll) in zip(owners, results):
        answer["predicted"][BASE_MODEL].extend(predicted.tolist())
        answer["nll"][BASE_MODEL] += float(nll.sum())


def _check_generate(model, examples, answers, count, progress) -> dict:
    """Greedy-generate `count` answers spread over the dataset (with memory); compare with teacher forcing."""
    count = min(count, len(answers))
    checked = [answers[number * len(answers) // count] for number in range(count)]
    agree = 0
    rows = []
    for answer in tqdm(checked, desc="retrieval: generate check", disable=not progress, unit="ans"):
        generated = greedy_answer(model, examples[answer["example"]]["input_ids"], answer["start"], answer["length"])
        teacher_forced = answer["predicted"][MEMORY] == answer["target"]
        generated_right = generated == answer["target"]
        agree += teacher_forced == generated_right
        rows.append(
            {
                "example": answer["example"],
                "generated": generated,
                "teacher_forced_exact": teacher_forced,
                "generated_exact": generated_right,
            }
        )
    return {"checked": len(checked), "agree": agree, "rows": rows}


@torch.no_grad()
def greedy_answer(model, input_ids, start: int, length: int) -> list[int]:
    """Greedy decoding of `length` tokens from the prompt `input_ids[:start]` (memory model, with memory).

    The prompt's whole segments before its last one are read with `model.memorize` (the state a forward
    leaves, without its reads and logits), and `generate` continues from the rest with that state: the same
    segment boundaries as generating from the whole prompt, affordable with a million tokens before the answer.
    """
    device = next(model.parameters()).device
    prompt = torch.as_tensor(list(input_ids[:start]), dtype=torch.long, device=device)[None]
    read = (start - 1) // model.config.segment_length * model.config.segment_length  # leaves >= 1 token to prompt
    state = model.memorize(prompt[:, :read]) if read else None
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else 0
    rest = prompt[:, read:]
    output = model.generate(
        input_ids=rest,
        attention_mask=torch.ones_like(rest),
        memory_state=state,
        max_new_tokens=length,  # no min_new_tokens: suppressing EOS would change the argmax
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
    )
    # an early EOS ends the answer (then padding), as in plain greedy decoding
    return output[0, rest.shape[1] :].tolist()


# -- aggregation ----------------------------------------------------------------------------------------
def summarize(answers: list[dict], conditions: list[str]) -> dict:
    """Per condition: exact match over answers, token accuracy and mean NLL over answer tokens."""
    tokens = sum(a["length"] for a in answers)
    summary = {}
    for condition in conditions:
        summary[condition] = {
            "exact_match": _ratio(sum(a["exact"][condition] for a in answers), len(answers)),
            "token_accuracy": _ratio(sum(a["correct_tokens"][condition] for a in answers), tokens),
            "answer_nll": _ratio(sum(a["nll"][condition] for a in answers), tokens),
        }
    return {"answers": len(answers), "tokens": tokens, "metrics": summary}


def bucket_by_segments(answers: list[dict], conditions: list[str]) -> list[dict]:
    """One bucket per distance in segments, with the range of token distances inside it."""
    buckets = []
    for distance in sorted({a["distance_segments"] for a in answers}):
        inside = [a for a in answers if a["distance_segments"] == distance]
        token_distances = [a["distance_tokens"] for a in inside]
        buckets.append(
            {
                "distance_segments": distance,
                "tokens_min": min(token_distances),
                "tokens_max": max(token_distances),
                **summarize(inside, conditions),
            }
        )
    return buckets


def bucket_by_tokens(answers: list[dict], conditions: list[str], bin_tokens: int) -> list[dict]:
    """Buckets of token distance [k * bin, (k + 1) * bin - 1] that hold at least one answer."""
    if bin_tokens <= 0:
        raise ValueError(f"distance_bin_tokens must be positive, got {bin_tokens}.")
    buckets = []
    for number in sorted({a["distance_tokens"] // bin_tokens for a in answers}):
        inside = [a for a in answers if a["distance_tokens"] // bin_tokens == number]
        buckets.append(
            {
                "tokens_from": number * bin_tokens,
                "tokens_to": (number + 1) * bin_tokens - 1,
                "segments": sorted({a["distance_segments"] for a in inside}),
                **summarize(inside, conditions),
            }
        )
    return buckets


def chance_levels(
    task: str | None, answers: list[dict], vocab_size: int, answer_alphabet: str | tuple[str, ...] | None = None
) -> dict:
    """Chance where it is defined. Token accuracy: a uniform guess over the vocabulary (1/V). Exact match:
    passkey: a uniformly drawn key of the same number of digits with no leading zero, as make_passkey_dataset
    draws them (1 / (9 * 10^(digits-1)), about 10^-digits); with `answer_alphabet` a str: a uniform string of
    the answer's length over those characters; a tuple of whole answers (the update task's places): one of
    them guessed uniformly (1 / their number, e.g. 1/8); otherwise a uniform guess of every answer token
    (V^-tokens)."""
    texts = [a["answer_text"] for a in answers]
    token_note = f"token accuracy: uniform over the {vocab_size}-token vocabulary (1/V)"
    chance = {"token_accuracy": 1.0 / vocab_size}
    if task == "passkey" and texts and all(t is not None and t.strip().isdigit() for t in texts):
        chance["exact_match"] = _mean([1.0 / (9 * 10 ** (len(t.strip()) - 1)) for t in texts])
        chance["note"] = (
            "exact match: a uniformly random key with the same number of digits and no leading zero "
            f"(1/(9*10^(digits-1)), about 10^-digits); {token_note}"
        )
    elif isinstance(answer_alphabet, (tuple, list)) and answer_alphabet:
        size = len(set(answer_alphabet))
        chance["exact_match"] = 1.0 / size
        chance["note"] = f"exact match: one of the {size} possible answers guessed uniformly (1/{size}); {token_note}"
    elif answer_alphabet and texts and all(t is not None for t in texts):
        size = len(set(answer_alphabet))
        chance["exact_match"] = _mean([float(size) ** -len(t) for t in texts])
        chance["note"] = f"exact match: a uniform string over the {size}-character answer alphabet; {token_note}"
    else:
        chance["exact_match"] = _mean([math.exp(-a["length"] * math.log(vocab_size)) for a in answers])
        chance["note"] = f"exact match: every answer token guessed uniformly (V^-tokens); {token_note}"
    return chance


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def describe_model(model) -> dict:
    config = model.config
    text = config.get_text_config()
    return {
        "base_model_type": text.model_type,
        "memory_type": config.memory_type,
        "memory_layers": list(config.memory_layers),
        "segment_length": config.segment_length,
        **config.memory_settings.capacity(),  # kv: memory_size and memory_topk; slot: num_slots
        "parameters": sum(p.numel() for p in model.parameters()),
        "memory_parameters": sum(p.numel() for p in model.memory_blocks.parameters()),
        "name_or_path": getattr(config, "_name_or_path", "") or "",
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None
