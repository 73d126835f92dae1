"""The three conditions every evaluation compares, and the teacher-forced forward passes behind them.

* `memory`: the memory model as trained. The input is cut into segments of `segment_length` (L)
  tokens; a token attends to the earlier tokens of its own segment and reads the memory written by
  all earlier segments.
* `memory_disabled`: the same weights inside `model.disable_memory()`: the same segments, no memory
  reads or writes, so a token sees only the earlier tokens of its own segment (0 to L-1 tokens).
* `base_model`: `model.language_model` alone (memory blocks removed) reading a sliding window of L
  tokens: each piece of an answer is predicted from the window of the L tokens that end just before
  the piece's last token. It never sees anything before that window.

All passes are teacher-forced: the logits at position `q` predict the token at `q + 1`, with the true
tokens as context. Memory models are run segment by segment with the state handed over between calls,
which is the same computation as one long forward (same segment boundaries) but keeps only one
segment's logits in memory at a time; segments with nothing to score only go into memory
(`model.memorize`: the same state, without logits), which is what makes a key a million tokens back
affordable to evaluate.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

MEMORY = "memory"
MEMORY_DISABLED = "memory_disabled"
BASE_MODEL = "base_model"
CONDITIONS = (MEMORY, MEMORY_DISABLED, BASE_MODEL)
CONDITION_LABELS = {MEMORY: "with memory", MEMORY_DISABLED: "memory disabled", BASE_MODEL: "base model (window)"}


def describe_conditions(segment_length: int) -> dict[str, str]:
    """What each condition sees, in words, with the numbers of this run (goes into every report)."""
    length = segment_length
    piece = base_window_piece(length)
    return {
        MEMORY: (
            f"memory model: input cut into segments of {length} tokens; a token attends to the earlier "
            f"tokens of its segment and reads the memory written by all earlier segments."
        ),
        MEMORY_DISABLED: (
            f"same weights inside model.disable_memory(): same segments of {length} tokens, no memory "
            f"reads or writes; a token sees only the earlier tokens of its own segment (0..{length - 1})."
        ),
        BASE_MODEL: (
            f"model.language_model alone (memory removed), sliding window of {length} tokens: answers are "
            f"cut into pieces of at most {piece} tokens and each piece is predicted from the {length} tokens "
            f"ending just before its last token, so a prediction sees between {length - piece + 1} and "
            f"{length} earlier tokens and nothing before that window."
        ),
    }


def base_window_piece(segment_length: int) -> int:
    """Most answer tokens predicted from one base-model window (so each sees >= L/2 earlier tokens)."""
    return max(1, math.ceil(segment_length / 2))


@torch.no_grad()
def streamed_predictions(model, input_ids, attention_mask, targets, *, use_memory: bool):
    """Teacher-forced argmax and negative log-likelihood of `targets` under a memory model.

    input_ids, attention_mask, targets: (B, T); `targets[:, q]` is the token that the logits at `q`
    should predict, -100 where nothing is scored. Returns (predicted (B, T) long, nll (B, T) float),
    filled where `targets != -100` (-1 and 0 elsewhere).
    """
    batch, length = input_ids.shape
    segment_length = model.config.segment_length
    scored = targets != -100
    predicted = torch.full((batch, length), -1, dtype=torch.long, device=input_ids.device)
    nll = torch.zeros(batch, length, dtype=torch.float32, device=input_ids.device)
    state = None
    unread = None  # first column of a run of unscored segments not yet read into memory
    disabled = nullcontext() if use_memory else model.disable_memory()
    with disabled:
        for start in range(0, length, segment_length):
            end = min(start + segment_length, length)
            piece_scored = scored[:, start:end]
            if not piece_scored.any():
                # Without memory a segment affects nothing else; with memory only what it writes matters,
                # which `memorize` computes without reads above the last memory layer and without logits.
                if use_memory and unread is None:
                    unread = start
                continue
            if unread is not None:
                if attention_mask[:, unread:start].any():
                    state = model.memorize(
                        input_ids[:, unread:start], attention_mask=attention_mask[:, unread:start], memory_state=state
                    )
                unread = None
            out = model(
                input_ids=input_ids[:, start:end],
                attention_mask=attention_mask[:, start:end],
                memory_state=state,
            )
            state = out.memory_state if use_memory else None
            _score(out.logits, targets[:, start:end], piece_scored, predicted[:, start:end], nll[:, start:end])
    return predicted, nll


@torch.no_grad()
def base_window_predictions(language_model, windows, batch_size: int):
    """Run the base model on short windows and score chosen positions.

    windows: list of (tokens (n,) long, local_positions (k,) long, targets (k,) long) with n <= L;
    the logits at `local_positions[i]` should predict `targets[i]`. Windows are right-padded (a causal
    model's earlier positions do not see the padding). Returns a list of (predicted (k,), nll (k,)).
    """
    results = []
    device = next(language_model.parameters()).device
    for first in range(0, len(windows), batch_size):
        chunk = windows[first : first + batch_size]
        width = max(tokens.numel() for tokens, _, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        for row, (tokens, _, _) in enumerate(chunk):
            ids[row, : tokens.numel()] = tokens.to(device)
            mask[row, : tokens.numel()] = 1
        logits = language_model(input_ids=ids, attention_mask=mask).logits.float()
        for row, (_, positions, targets) in enumerate(chunk):
            row_logits = logits[row, positions.to(device)]  # (k, V)
            log_probs = torch.log_softmax(row_logits, dim=-1)
            targets = targets.to(device)
            results.append((row_logits.argmax(-1).cpu(), (-log_probs.gather(-1, targets[:, None])[:, 0]).cpu()))
    return results


def _score(logits, targets, scored, predicted_out, nll_out) -> None:
    """Write argmax and NLL of the scored positions of one segment into the (sliced) output tensors."""
    rows, cols = scored.nonzero(as_tuple=True)
    picked = logits[rows, cols].float()  # (n, V): only the scored positions go through softmax
    log_probs = torch.log_softmax(picked, dim=-1)
    wanted = targets[rows, cols]
    predicted_out[rows, cols] = picked.argmax(-1)
    nll_out[rows, cols] = -log_probs.gather(-1, wanted[:, None])[:, 0]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF labels (token t scored at t) -> targets for the logits (position q predicts token q + 1)."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    return targets


def pad_batch(rows: list[list[int]], pad_value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad lists of ids to one tensor; returns (tensor (B, T), attention mask (B, T) long)."""
    width = max(len(row) for row in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return out.to(device), mask.to(device)
