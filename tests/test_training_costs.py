"""What makes a training step through several segments cost what the base model's steps cost: the loss computed a
segment at a time (the same loss and gradients as transformers' own), and freed memory kept for reuse (glibc)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, build
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_memlm.memory_segments import sequence_loss
from hf_memlm.training.cpu_allocator import _glibc


def _logits_and_labels(length: int, ignored: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, length, 11, generator=generator, dtype=torch.float64).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, length), generator=generator)
    labels[0, :ignored] = -100  # a prompt that is not scored
    return logits.requires_grad_(), labels


@pytest.mark.parametrize("items", [None, 17, "tensor"])
@pytest.mark.parametrize("length, chunk", [(13, 4), (12, 4), (5, 8)])
def test_sequence_loss_and_its_gradient_are_transformers_causal_lm_loss(length, chunk, items):
    kwargs = {} if items is None else {"num_items_in_batch": torch.tensor(17) if items == "tensor" else items}
    logits, labels = _logits_and_labels(length)
    ours = sequence_loss(ForCausalLMLoss, logits, labels, chunk, **kwargs)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    theirs = ForCausalLMLoss(logits=logits, labels=labels, vocab_size=11, **kwargs)
    (theirs_grad,) = torch.autograd.grad(theirs, logits)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_grad, theirs_grad)


def test_sequence_loss_honours_ignore_index_and_gives_nan_with_nothing_scored():
    logits, labels = _logits_and_labels(9)
    labels[(labels == 4) | (labels == -100)] = -1
    kwargs = {"ignore_index": -1}
    expected = ForCausalLMLoss(logits=logits, labels=labels, vocab_size=11, **kwargs)
    torch.testing.assert_close(sequence_loss(ForCausalLMLoss, logits, labels, 4, **kwargs), expected)
    nothing = torch.full_like(labels, -100)
    assert torch.isnan(sequence_loss(ForCausalLMLoss, logits, nothing, 4))  # as transformers' mean over nothing


def test_a_loss_function_of_the_users_is_called_as_it_is():
    logits, labels = _logits_and_labels(6)
    seen = {}

    def loss_function(logits, labels, vocab_size, **kwargs):
        seen.update(shape=tuple(logits.shape), vocab_size=vocab_size, kwargs=kwargs)
        return logits.float().mean()

    sequence_loss(loss_function, logits, labels, 4, num_items_in_batch=3)
    assert seen == {"shape": (2, 6, 11), "vocab_size": 11, "kwargs": {"num_items_in_batch": 3}}


def test_the_models_loss_is_the_causal_lm_loss_of_its_logits(arch_kind):
    model = build(*arch_kind)
    ids = torch.randint(1, VOCAB, (2, 2 * model.config.segment_length + 5), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, :7] = -100
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding of 7 tokens, not a multiple of the segment
    out = model(ids, attention_mask=mask, labels=labels)
    expected = ForCausalLMLoss(logits=out.logits, labels=labels, vocab_size=out.logits.shape[-1])
    torch.testing.assert_close(out.loss, expected)
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum() * 0  # a user's own loss
    assert model(ids, attention_mask=mask, labels=labels).loss.item() == 0


_REUSE_PROBE = """
import resource, torch
from hf_memlm.training import keep_freed_memory
print(keep_freed_memory())
faults = []
for step in range(6):  # 64 MB made and freed at once, as a step's activations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(1 << 24)  # reused, or mapped and faulted in anew
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults[3:])  # the heap settles in the first steps
"""


@pytest.mark.skipif(_glibc() is None, reason="malloc's settings are glibc's")
def test_freed_memory_is_reused_unless_the_environment_says_no():
    def probe(setting: str | None) -> tuple[str, list[int]]:
        env = {key: value for key, value in os.environ.items() if key != "HF_MEMLM_KEEP_FREED_MEMORY"}
        if setting is not None:
            env["HF_MEMLM_KEEP_FREED_MEMORY"] = setting
        out = subprocess.run([sys.executable, "-c", _REUSE_PROBE], env=env, capture_output=True, text=True, check=True)
        applied, *faults = out.stdout.split()
        return applied, [int(count) for count in faults]

    kept, kept_faults = probe(None)
    left, left_faults = probe("0")
    assert (kept, left) == ("True", "False")
    pages = (1 << 26) // os.sysconf("SC_PAGE_SIZE")
    assert min(left_faults) > pages // 2, left_faults  # glibc unmapped the block: every page is faulted in again
    assert max(kept_faults) < pages // 10, kept_faults
