"""Perplexity by segment position on long documents: does memory of segments < s help on segment s?

Each example is one stretch of one document (`hf_memlm.data.pack_documents`: `num_segments *
segment_length` tokens, in document order). A prediction belongs to the segment of the position that
makes it: the logits at position q (predicting token q + 1) fall in segment q // L, so segment s covers
the tokens s*L + 1 .. (s+1)*L, all predicted with memory of segments < s.

With memory disabled the same weights run on the same segments with no reads or writes, which is
exactly the base model reading each segment on its own; the gap between the two curves is what memory
buys at each depth into the document.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .conditions import (
    CONDITION_LABELS,
    MEMORY,
    MEMORY_DISABLED,
    describe_conditions,
    pad_batch,
    shift_labels,
    streamed_predictions,
)
from .retrieval import describe_model


def evaluate_perplexity(
    model,
    dataset,
    *,
    batch_size: int = 4,
    baselines: bool = True,
    position_bins: int = 8,
    progress: bool = True,
) -> dict:
    """Per-segment perplexity of a `MemLMForCausalLM` with memory, and with memory disabled.

    dataset: rows with `input_ids` (and optionally `labels`, -100 where not scored, and `attention_mask`),
        e.g. from `pack_documents`. position_bins: bins of the position inside a segment for the
        `by_position_in_segment` curve (segments >= 1 only, where there is memory to read).
    Returns a JSON-ready dict (see `write_report`).
    """
    rows = _read_rows(dataset)
    segment_length = model.config.segment_length
    conditions = [MEMORY, MEMORY_DISABLED] if baselines else [MEMORY]
    device = next(model.parameters()).device
    longest = max(len(r["input_ids"]) for r in rows)
    num_segments = math.ceil(longest / segment_length)
    bins = max(1, min(position_bins, segment_length))
    sums = {c: torch.zeros(num_segments, dtype=torch.float64) for c in conditions}
    counts = torch.zeros(num_segments, dtype=torch.float64)
    bin_sums = {c: torch.zeros(bins, dtype=torch.float64) for c in conditions}
    bin_counts = torch.zeros(bins, dtype=torch.float64)

    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(rows) * len(conditions), desc="perplexity", disable=not progress, unit="ex")
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            ids, mask = pad_batch([r["input_ids"] for r in chunk], 0, device)
            labels, _ = pad_batch([r.get("labels") or r["input_ids"] for r in chunk], -100, device)
            if all(r.get("attention_mask") is not None for r in chunk):
                given, _ = pad_batch([r["attention_mask"] for r in chunk], 0, device)
                mask = mask * given
            labels = labels.masked_fill(mask == 0, -100)
            targets = shift_labels(labels)
            scored = (targets != -100).cpu()
            positions = torch.arange(targets.shape[1])
            segment_of = (positions // segment_length).expand_as(scored)[scored]
            in_segment = positions % segment_length
            later = scored & (positions // segment_length >= 1)
            bin_of = (in_segment * bins // segment_length).expand_as(scored)[later]
            counts += torch.bincount(segment_of, minlength=num_segments).double()
            bin_counts += torch.bincount(bin_of, minlength=bins).double()
            for condition in conditions:
                _, nll = streamed_predictions(model, ids, mask, targets, use_memory=condition == MEMORY)
                nll = nll.cpu().double()
                sums[condition] += torch.bincount(segment_of, weights=nll[scored], minlength=num_segments)
                bin_sums[condition] += torch.bincount(bin_of, weights=nll[later], minlength=bins)
                bar.update(len(chunk))
        bar.close()
    finally:
        model.train(was_training)

    by_segment = []
    for segment in range(num_segments):
        entry = {
            "segment": segment,
            "tokens_from": segment * segment_length + 1,
            "tokens_to": min((segment + 1) * segment_length, longest - 1),
            "tokens": int(counts[segment]),
            **_metrics({c: sums[c][segment].item() for c in conditions}, counts[segment].item(), conditions),
        }
        by_segment.append(entry)
    by_position = []
    for number in range(bins):
        first_position = -(-number * segment_length // bins)
        last_position = -(-(number + 1) * segment_length // bins) - 1
        by_position.append(
            {
                "positions_from": first_position,
                "positions_to": last_position,
                "tokens": int(bin_counts[number]),
                **_metrics({c: bin_sums[c][number].item() for c in conditions}, bin_counts[number].item(), conditions),
            }
        )
    total = counts.sum().item()
    descriptions = describe_conditions(segment_length)
    return {
        "kind": "perplexity",
        "task": "perplexity",
        "segment_length": segment_length,
        "num_examples": len(rows),
        "num_segments": num_segments,
        "conditions": conditions,
        "condition_labels": {c: CONDITION_LABELS[c] for c in conditions},
        "condition_descriptions": {c: descriptions[c] for c in conditions},
        "method": (
            "teacher-forced per-token negative log-likelihood; the prediction made at position q counts for "
            "segment q // L; perplexity = exp(mean NLL); gap = perplexity with memory disabled minus with memory"
        ),
        "overall": {"tokens": int(total), **_metrics({c: sums[c].sum().item() for c in conditions}, total, conditions)},
        "by_segment": by_segment,
        "by_position_in_segment": by_position,
        "model": describe_model(model),
    }


def _metrics(nll_sums: dict[str, float], count: float, conditions: list[str]) -> dict:
    if not count:
        return {"nll": {c: None for c in conditions}, "perplexity": {c: None for c in conditions}, "gap": None}
    nll = {c: nll_sums[c] / count for c in conditions}
    perplexity = {c: math.exp(min(nll[c], 700.0)) for c in conditions}
    gap = perplexity[MEMORY_DISABLED] - perplexity[MEMORY] if MEMORY_DISABLED in conditions else None
    return {"nll": nll, "perplexity": perplexity, "gap": gap}


def _read_rows(dataset) -> list[dict]:
    if hasattr(dataset, "column_names"):
        columns = [c for c in ("input_ids", "labels", "attention_mask") if c in dataset.column_names]
        if "input_ids" not in columns:
            raise ValueError(
                f"the perplexity dataset has no input_ids column (it has {dataset.column_names}); pack documents "
                "with hf_memlm.data.pack_documents(dataset, tokenizer, segment_length, num_segments)."
            )
        rows = [dict(zip(columns, values)) for values in zip(*(list(dataset[c]) for c in columns))]
    else:
        rows = [dict(r) for r in dataset]
        if rows and "input_ids" not in rows[0]:
            raise ValueError("the perplexity dataset rows need input_ids (pack them with pack_documents).")
    if not rows:
        raise ValueError(
            "the perplexity dataset is empty: no document was long enough to fill one example; "
            "use longer documents or fewer segments."
        )
    for row in rows:
        if row.get("labels") is not None:
            row["labels"] = list(row["labels"])
        if len(row["input_ids"]) < 2:
            raise ValueError("a perplexity example has fewer than 2 tokens: nothing to predict.")
    return rows
