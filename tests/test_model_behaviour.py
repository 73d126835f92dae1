"""Behaviours every (base architecture x memory kind) must have."""

from __future__ import annotations

import pytest
import torch
from conftest import SEGMENT, VOCAB, base_config, build, memory_settings, randomize_memory
from transformers import AutoModelForCausalLM

import hf_memlm
from hf_memlm import MemoryState


def _ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_identity_at_init(arch_kind):
    """A freshly built memory model computes exactly what its base computes, on every segment."""
    model = build(*arch_kind, randomized=False)
    ids = _ids(2, 3 * SEGMENT)
    with torch.no_grad():
        logits = model(ids).logits
        for start in range(0, ids.shape[1], SEGMENT):
            base = model.language_model(ids[:, start : start + SEGMENT]).logits
            torch.testing.assert_close(logits[:, start : start + SEGMENT], base, rtol=0, atol=1e-6)


def test_from_base_is_identity_and_keeps_weights(arch_kind):
    model_type, kind = arch_kind
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(base_config(model_type)).eval()
    base_state = {k: v.clone() for k, v in reference.state_dict().items()}
    wrapped = hf_memlm.MemLMForCausalLM.from_base(reference, **memory_settings(kind))
    for key, value in wrapped.language_model.state_dict().items():
        assert torch.equal(value, base_state[key]), f"from_base changed base weight {key}"
    ids = _ids(1, 2 * SEGMENT)
    with torch.no_grad():
        torch.testing.assert_close(
            wrapped(ids).logits[:, SEGMENT:], reference(ids[:, SEGMENT:]).logits, rtol=0, atol=1e-6
        )


def test_backward_reaches_memory(arch_kind):
    """Several segments, forward + backward: the output projection gets gradient at the first step
    (LoRA-style zero init), and after one optimizer step every memory parameter does."""
    model = build(*arch_kind, randomized=False).train()
    ids = _ids(2, 4 * SEGMENT)
    model(ids, labels=ids).loss.backward()
    for name, block in model.memory_blocks.items():
        out_proj = block.output_projection
        assert out_proj.weight.grad is not None and out_proj.weight.grad.abs().sum() > 0, name
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.memory_blocks.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reaches memory parameter {name}"


def test_streaming_equivalence(arch_kind):
    """One call on 2L tokens equals two calls of L tokens with the MemoryState passed on."""
    model = build(*arch_kind)
    ids = _ids(2, 4 * SEGMENT)
    half = 2 * SEGMENT
    with torch.no_grad():
        whole = model(ids)
        first = model(ids[:, :half])
        second = model(ids[:, half:], memory_state=first.memory_state)
    torch.testing.assert_close(second.logits, whole.logits[:, half:], rtol=1e-5, atol=1e-5)
    for layer, tensors in whole.memory_state.layers.items():
        for name, tensor in tensors.items():
            torch.testing.assert_close(second.memory_state.layers[layer][name], tensor, rtol=1e-5, atol=1e-5)
    # and the memory matters: without the state the second half reads an empty memory
    with torch.no_grad():
        fresh = model(ids[:, half:])
    assert (fresh.logits - whole.logits[:, half:]).abs().max() > 1e-4


def test_batch_isolation_with_padding(arch_kind):
    """A row's outputs are the same alone or batched (right-padded) with other rows."""
    model = build(*arch_kind)
    lengths = [3 * SEGMENT + 3, 1 * SEGMENT + 5, 4 * SEGMENT]
    rows = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((len(rows), width), 1, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        assert torch.isfinite(batched.logits).all(), "padding produced non-finite logits"
        for i, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            torch.testing.assert_close(batched.logits[i, : len(row)], alone, rtol=1e-4, atol=1e-4)
        # rows do not mix: changing another row leaves row 0 untouched
        other = ids.clone()
        other[1:, :] = _ids(len(rows) - 1, width, seed=99)
        changed = model(other, attention_mask=mask)
        torch.testing.assert_close(changed.logits[0], batched.logits[0], rtol=1e-5, atol=1e-5)


def test_padded_tokens_are_never_written(arch_kind):
    """What stands in padded positions does not reach the memory."""
    model = build(*arch_kind)
    ids = _ids(1, 2 * SEGMENT + 4)
    mask = torch.ones_like(ids)
    mask[:, -6:] = 0
    garbage = ids.clone()
    garbage[:, -6:] = _ids(1, 6, seed=5)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).memory_state
        b = model(garbage, attention_mask=mask).memory_state
    for layer, tensors in a.layers.items():
        for name, tensor in tensors.items():
            assert torch.equal(tensor, b.layers[layer][name]), f"padding leaked into memory ({name})"


def test_generate_matches_forward(arch_kind):
    """Greedy generation past the window (prompt of several segments, new tokens crossing boundaries)
    picks the tokens a plain forward over the whole sequence predicts: same segments, same memory."""
    model = build(*arch_kind)
    model.generation_config.eos_token_id = None  # run the full length, whatever the random model predicts
    prompt = _ids(2, 2 * SEGMENT + 3)
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=SEGMENT + 4, do_sample=False, pad_token_id=0
    )
    with torch.no_grad():
        predicted = model(out).logits.argmax(-1)
    new = out.shape[1] - prompt.shape[1]
    assert new == SEGMENT + 4
    torch.testing.assert_close(predicted[:, prompt.shape[1] - 1 : -1], out[:, prompt.shape[1] :])


@pytest.mark.parametrize("switch", ["disable_memory", "memory_disabled"])  # the name, and the earlier one
def test_memory_disabled_is_the_base(arch_kind, switch):
    model = build(*arch_kind)
    ids = _ids(1, 3 * SEGMENT)
    with torch.no_grad():
        with getattr(model, switch)() as entered:
            assert entered is model and not model.memory_enabled
            off = model(ids)
        on = model(ids)
        base_last = model.language_model(ids[:, -SEGMENT:]).logits
    torch.testing.assert_close(off.logits[:, -SEGMENT:], base_last, rtol=0, atol=1e-6)
    assert (on.logits[:, -SEGMENT:] - base_last).abs().max() > 1e-4
    assert model.memory_enabled


def test_slot_state_size_is_constant():
    model = build("llama", "slot")
    with torch.no_grad():
        state = model(_ids(1, SEGMENT)).memory_state
        shapes = {name: t.shape for name, t in state.layers[0].items()}
        for step in range(6):
            state = model(_ids(1, 5 * SEGMENT, seed=step), memory_state=state).memory_state
            assert {name: t.shape for name, t in state.layers[0].items()} == shapes


def test_randomized_memory_changes_outputs():
    # guards the fixtures: a test of "memory matters" must not pass with zero weights
    model = build("llama", "kv", randomized=False)
    ids = _ids(1, 2 * SEGMENT)
    with torch.no_grad():
        before = model(ids).logits
        randomize_memory(model)
        after = model(ids).logits
    assert (before[:, SEGMENT:] - after[:, SEGMENT:]).abs().max() > 1e-4
    torch.testing.assert_close(before[:, :SEGMENT], after[:, :SEGMENT])


def test_generate_reads_a_remembered_document():
    """Reading a document into a MemoryState, then generating from a short prompt with it, equals
    generating from document + prompt (the document is whole segments, so the segmentation matches)."""
    model = build("llama", "kv")
    model.generation_config.eos_token_id = None
    document, prompt = _ids(1, 5 * SEGMENT, seed=7), _ids(1, 5, seed=8)
    with torch.no_grad():
        state = model(document).memory_state
    with_state = model.generate(prompt, memory_state=state, max_new_tokens=10, do_sample=False, pad_token_id=0)
    together = model.generate(torch.cat([document, prompt], 1), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(with_state[:, 5:], together[:, 5 * SEGMENT + 5 :])
    embeds = model.generate(
        inputs_embeds=model.get_input_embeddings()(prompt),
        memory_state=state,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(embeds, with_state[:, 5:])


@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_beam_search_reorders_memory(kind):
    """Beam scores equal the log-probability a forward assigns to the returned sequences, also when
    the new tokens cross a segment boundary (the window is written to memory per beam)."""
    model = build("llama", kind)
    model.generation_config.eos_token_id = None
    prompt = _ids(1, SEGMENT + 5, seed=4)
    out = model.generate(
        prompt,
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=8,
        do_sample=False,
        length_penalty=0.0,
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=0,
    )
    with torch.no_grad():
        logprobs = model(out.sequences).logits.log_softmax(-1)
    start = prompt.shape[1]
    new = out.sequences[:, start:]
    forward_scores = logprobs[:, start - 1 : -1].gather(-1, new[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, forward_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("base", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["kv", "slot"])
def test_gradient_checkpointing_gives_the_same_gradients(base, kind):
    """Checkpointing replays a layer on backward; the memory read/write must not run twice."""
    ids = _ids(2, 3 * SEGMENT)
    grads = []
    for checkpointing in (False, True):
        model = build(base, kind).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.decoder_layers)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("wrapped", ["from_config", "from_base"])
def test_causal(arch_kind, wrapped):
    """Changing later tokens never changes earlier logits (within a segment and across segments)."""
    model_type, kind = arch_kind
    if wrapped == "from_config":
        model = build(model_type, kind)
    else:
        base = AutoModelForCausalLM.from_config(base_config(model_type)).eval()
        model = hf_memlm.MemLMForCausalLM.from_base(base, **memory_settings(kind))
        assert base.config._attn_implementation is not None
        randomize_memory(model)
    ids = _ids(1, 2 * SEGMENT + 4)
    cut = SEGMENT + 3
    changed = ids.clone()
    changed[:, cut:] = _ids(1, ids.shape[1] - cut, seed=77)
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=0, atol=1e-6)
    assert (a[:, cut:] - b[:, cut:]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["kv", "slot"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=3, num_return_sequences=2, do_sample=False),
        dict(num_return_sequences=2, do_sample=True, top_k=1),  # sampling, but deterministic
    ],
    ids=["beams", "return-sequences"],
)
def test_generate_expands_a_batched_memory_state(kind, settings):
    """Two prompts with a two-row state, with beams / several return sequences, give each prompt what it
    gives alone with its own state row (generate repeats the prompts; the state is repeated with them)."""
    model = build("llama", kind)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        state = model(_ids(2, 2 * SEGMENT, seed=30)).memory_state
    prompts = _ids(2, SEGMENT + 2, seed=31)
    common = dict(max_new_tokens=SEGMENT, pad_token_id=0, **settings)
    batched = model.generate(prompts, memory_state=state, **common)
    assert batched.shape[0] == 4
    for row in range(2):
        alone = model.generate(prompts[row : row + 1], memory_state=state.select([row]), **common)
        assert torch.equal(batched[2 * row : 2 * row + 2], alone), f"prompt {row}"


@pytest.mark.parametrize("bptt, reaches_first_segment", [(None, True), (1, False)])
def test_bptt_segments_cuts_gradients_between_segments(bptt, reaches_first_segment):
    """With `bptt_segments=1` the last segment's loss sends no gradient into the first segment's inputs
    (the state is detached after every segment); without it the gradient flows through memory."""
    model = build("llama", "kv")
    model.config.bptt_segments = bptt
    ids = _ids(2, 3 * SEGMENT)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row: its segments start 3 columns later
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    logits[:, -1].sum().backward()
    first_segment = embeds.grad[0, :SEGMENT].abs().sum(), embeds.grad[1, 3 : 3 + SEGMENT].abs().sum()
    assert all((grad > 0) == reaches_first_segment for grad in first_segment)


def test_one_remembered_row_serves_a_padded_batch_without_a_copy_per_row(arch_kind):
    """A one-row state given to a batch (a document remembered once, many prompts) is a view of that row, not
    a copy per row; each row reads and writes exactly as with its own copy, left padding included."""
    base, kind = arch_kind
    model = build(base, kind)
    with torch.no_grad():
        state = model(_ids(1, 5 * SEGMENT, seed=7)).memory_state
        shared = state.select([0, 0, 0])
        copied = MemoryState(
            state.memory_type,
            {i: {n: t.repeat(3, *[1] * (t.dim() - 1)) for n, t in d.items()} for i, d in state.layers.items()},
        )
        for name, tensor in shared.layers[0].items():
            assert tensor.stride(0) == 0 and tensor.data_ptr() == state.layers[0][name].data_ptr(), name
        ids = _ids(3, 2 * SEGMENT + 3, seed=8)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0  # left padding of 5 and 1 tokens: not multiples of the segment
        mask[2, :1] = 0
        out_shared = model(ids, attention_mask=mask, memory_state=shared)
        out_copied = model(ids, attention_mask=mask, memory_state=copied)
    torch.testing.assert_close(out_shared.logits, out_copied.logits)
    for layer, tensors in out_copied.memory_state.layers.items():
        for name, tensor in tensors.items():
            torch.testing.assert_close(out_shared.memory_state.layers[layer][name], tensor, msg=name)


def test_logits_to_keep_scores_the_labelled_tail_at_the_cost_of_reading(arch_kind):
    """Labels only at the end (a question after a document), left padding of 3 (not a multiple of the segment):
    with `logits_to_keep` covering the labelled tail, the loss, every parameter's gradient and the memory state
    equal those of a full forward, though the segments before the tail run only up to the memory layer."""
    model = build(*arch_kind).eval()  # no dropout: the two runs must see the same computation
    length, tail = 4 * SEGMENT + 3, SEGMENT + 2
    ids = _ids(2, length)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = torch.full_like(ids, -100)
    labels[:, -tail + 1 :] = ids[:, -tail + 1 :]
    runs = {}
    for keep in (0, tail):
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=labels, logits_to_keep=keep)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        runs[keep] = (out, grads)
    (full, full_grads), (kept, kept_grads) = runs[0], runs[tail]
    assert kept.logits.shape[1] == tail
    torch.testing.assert_close(kept.logits, full.logits[:, -tail:], rtol=0, atol=1e-5)
    torch.testing.assert_close(kept.loss, full.loss, rtol=0, atol=1e-6)
    assert full_grads.keys() == kept_grads.keys() and any("memory_blocks" in name for name in full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for index in model.config.memory_layers:
        for name, tensor in full.memory_state.layers[index].items():
            torch.testing.assert_close(kept.memory_state.layers[index][name], tensor, rtol=0, atol=1e-6)
