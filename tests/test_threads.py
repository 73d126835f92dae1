"""One model called from several threads at once gives each call what it gives when called alone."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import SEGMENT, VOCAB, build, run_in_threads

THREADS = 4
CALLS_PER_THREAD = 6


def _work(thread: int) -> list[tuple[torch.Tensor, dict]]:
    """Each thread streams its own document: calls carrying the memory state from one to the next."""
    generator = torch.Generator().manual_seed(100 + thread)
    return [torch.randint(3, VOCAB, (2, 2 * SEGMENT + 3), generator=generator) for _ in range(CALLS_PER_THREAD)]


def _stream(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    logits, state = [], None
    with torch.no_grad():
        for ids in inputs:
            out = model(ids, memory_state=state)
            logits.append(out.logits)
            state = out.memory_state
    return logits


def _in_threads(task) -> dict[int, object]:
    return run_in_threads(task, THREADS)


@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_concurrent_calls_equal_serial_calls(kind):
    model = build("llama", kind)
    work = [_work(t) for t in range(THREADS)]
    serial = [_stream(model, inputs) for inputs in work]

    results = _in_threads(lambda thread: _stream(model, work[thread]))
    wrong = [
        (t, call)
        for t in range(THREADS)
        for call in range(CALLS_PER_THREAD)
        if not torch.allclose(results[t][call], serial[t][call], rtol=1e-5, atol=1e-5)
    ]
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS_PER_THREAD} concurrent calls differ from serial: {wrong}"


def test_concurrent_generation_equals_serial():
    model = build("gpt2", "kv")
    model.generation_config.eos_token_id = None
    prompts = [
        torch.randint(3, VOCAB, (1, SEGMENT + 3 + t), generator=torch.Generator().manual_seed(t)) for t in range(3)
    ]
    settings = dict(max_new_tokens=SEGMENT + 2, do_sample=False, pad_token_id=0)
    serial = [model.generate(p, **settings) for p in prompts]
    results = run_in_threads(lambda index: model.generate(prompts[index], **settings), len(prompts))
    for index, expected in enumerate(serial):
        assert torch.equal(results[index], expected), f"thread {index}"


@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_memory_disabled_in_one_thread_leaves_other_threads_their_memory(kind):
    model = build("llama", kind)
    ids = torch.randint(3, VOCAB, (2, 3 * SEGMENT), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with_memory = model(ids).logits
        with model.memory_disabled():
            without_memory = model(ids).logits
    assert not torch.allclose(with_memory, without_memory, atol=1e-4)  # memory matters for these inputs
    inside, outside = threading.Event(), threading.Event()
    results = {}

    def baseline() -> None:
        with torch.no_grad(), model.memory_disabled():
            inside.set()
            outside.wait(timeout=30)
            results["disabled"] = model(ids).logits

    thread = threading.Thread(target=baseline)
    thread.start()
    inside.wait(timeout=30)
    with torch.no_grad():
        results["enabled"] = model(ids).logits  # while the other thread holds memory_disabled()
    outside.set()
    thread.join()
    assert torch.allclose(results["enabled"], with_memory, atol=1e-6)
    assert torch.allclose(results["disabled"], without_memory, atol=1e-6)
    assert model.memory_enabled


@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_memorize_in_some_threads_leaves_forwards_in_others_whole(kind):
    # memorize stops the base model after the memory layer (its hook raises) and skips the read there; that
    # is per call, so forwards running meanwhile in other threads still read and run every layer.
    model = build("llama", kind)
    work = [_work(t) for t in range(THREADS)]
    serial_logits = {t: _stream(model, work[t]) for t in range(0, THREADS, 2)}
    serial_states = {t: model.memorize(torch.cat(work[t], dim=1)) for t in range(1, THREADS, 2)}

    def task(thread: int):
        if thread % 2 == 0:
            return _stream(model, work[thread])
        return model.memorize(torch.cat(work[thread], dim=1))

    results = _in_threads(task)
    for t, logits in serial_logits.items():
        for got, expected in zip(results[t], logits):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for t, state in serial_states.items():
        for layer, tensors in state.layers.items():
            for name, tensor in tensors.items():
                torch.testing.assert_close(results[t].layers[layer][name], tensor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_threads_sharing_one_remembered_row_each_get_their_own_answers(kind):
    # One document remembered once, asked from several threads with beams: each thread's rows are views of the
    # document's row (`MemoryState.select`) that its writes must never reach into for the others.
    model = build("llama", kind)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        document = model(torch.randint(3, VOCAB, (1, 4 * SEGMENT + 3), generator=torch.Generator().manual_seed(9)))
    state = document.memory_state
    prompts = [
        torch.randint(3, VOCAB, (1, SEGMENT + 2), generator=torch.Generator().manual_seed(t)) for t in range(THREADS)
    ]
    settings = dict(num_beams=2, max_new_tokens=SEGMENT + 3, do_sample=False, pad_token_id=0, memory_state=state)
    serial = [model.generate(prompt, **settings) for prompt in prompts]
    results = _in_threads(lambda thread: model.generate(prompts[thread], **settings))
    for thread, expected in enumerate(serial):
        assert torch.equal(results[thread], expected), f"thread {thread}"
