"""`torch.compile`: a fixed-shape training forward (fresh memory, no padding, several segments) compiles with at
most a handful of graph breaks, and the compiled model computes what the eager one does (loss, gradients,
memory switched off), for every kind. `benchmarks/bench_compile.py` measures the speed-up."""

from __future__ import annotations

import pytest
import torch
from conftest import BASES, KINDS, SEGMENT, VOCAB, build

# A fixed-shape step breaks the graph once, at the input checks (`check_inputs` reads the ids' range back to
# the host); an attention_mask adds the padding pattern's one read (counted once per frame it cuts: 3).
BREAKS_WITHOUT_MASK = 1
BREAKS_WITH_MASK = 4


def _batch(segments: int = 4):
    ids = torch.randint(3, VOCAB, (2, segments * SEGMENT), generator=torch.Generator().manual_seed(0))
    return ids


def _step(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    weights = getattr(model, "_orig_mod", model)  # a compiled model's parameters are its original's
    grads = {name: param.grad.clone() for name, param in weights.named_parameters() if param.grad is not None}
    return out, grads


def _assert_same_step(eager, compiled):
    (eager_out, eager_grads), (compiled_out, compiled_grads) = eager, compiled
    torch.testing.assert_close(compiled_out.loss, eager_out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    assert any(name.startswith("memory_blocks") for name in eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for layer, tensors in eager_out.memory_state.layers.items():
        for name, tensor in tensors.items():
            torch.testing.assert_close(compiled_out.memory_state.layers[layer][name], tensor, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_shape_training_step_compiles_with_a_handful_of_graph_breaks_and_equals_eager(kind):
    model = build("llama", kind).train()
    ids = _batch()
    graphs = []

    def count_graphs(graph, example_inputs):  # a backend that runs the captured graphs as they are
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=count_graphs)
    plain = dict(input_ids=ids, labels=ids)
    _assert_same_step(_step(model, **plain), _step(compiled, **plain))
    assert len(graphs) - 1 <= BREAKS_WITHOUT_MASK, [graph.code for graph in graphs]
    before = len(graphs)
    _assert_same_step(_step(model, **plain), _step(compiled, **plain))
    assert len(graphs) == before  # the next step of the same shape recompiles nothing

    masked = dict(plain, attention_mask=torch.ones_like(ids))
    _assert_same_step(_step(model, **masked), _step(compiled, **masked))
    assert len(graphs) - before - 1 <= BREAKS_WITH_MASK


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "ones_mask"])
def test_aot_compiled_training_step_equals_eager(kind, masked):
    # aot_eager traces forward and backward as inductor does, without compiling kernels
    model = build("llama", kind).train()
    ids = _batch()
    inputs = dict(input_ids=ids, labels=ids, attention_mask=torch.ones_like(ids) if masked else None)
    eager = _step(model, **inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # the second call runs the cached graphs
        _assert_same_step(eager, _step(compiled, **inputs))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_padded_and_disabled_calls_equal_eager(kind):
    """Off the fast path (padding, a state passed in, memory switched off) compiled calls still compute what
    eager ones do."""
    model = build("llama", kind)
    ids = _batch(3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        first = model(ids, attention_mask=mask)
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits, first.logits)
        more = compiled(ids, memory_state=first.memory_state).logits
        torch.testing.assert_close(more, model(ids, memory_state=first.memory_state).logits)
        with model.memory_disabled():
            off = compiled(ids).logits
            torch.testing.assert_close(off, model(ids).logits)
        on = compiled(ids).logits
    assert not torch.allclose(on, off)  # memory is on again once the block is left
    torch.testing.assert_close(on, model(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(BASES))
def test_compiled_training_step_equals_eager_on_every_base(model_type):
    """Bases that pass keywords on to their decoder layers get the memory contexts that way under compile;
    others through the per-thread context: either way the step is eager's."""
    model = build(model_type, "kv")  # in eval mode: dropout draws differ between eager and compiled code
    ids = _batch(3)
    eager = _step(model, input_ids=ids, labels=ids)
    torch._dynamo.reset()
    _assert_same_step(eager, _step(torch.compile(model, backend="aot_eager"), input_ids=ids, labels=ids))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_inductor_compiled_training_step_equals_eager(kind):
    model = build("llama", kind).train()
    ids = _batch()
    eager = _step(model, input_ids=ids, labels=ids)
    torch._dynamo.reset()
    _assert_same_step(eager, _step(torch.compile(model), input_ids=ids, labels=ids))


@pytest.mark.slow
@pytest.mark.parametrize("drops_keywords", [False, True], ids=["takes_none", "drops_them"])
def test_compiled_step_equals_eager_when_the_base_does_not_pass_keywords_on(drops_keywords, monkeypatch):
    """A base that takes no unknown keywords, or takes them but does not pass them on to its layers, gets the
    memory contexts the usual way (per-thread) under compile: graph breaks, but the same step."""
    model = build("llama", "kv").train()
    ids = _batch(3)
    eager = _step(model, input_ids=ids, labels=ids)
    if drops_keywords:
        inner = model.language_model.model
        forward = inner.forward
        monkeypatch.setattr(inner, "forward", lambda *args, memlm_contexts=None, **kwargs: forward(*args, **kwargs))
    else:
        monkeypatch.setattr(model, "_keyword_contexts", False)
    torch._dynamo.reset()
    _assert_same_step(eager, _step(torch.compile(model, backend="eager"), input_ids=ids, labels=ids))
