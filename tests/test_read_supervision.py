"""The loss on what `kv` reads pick (`read_targets`, `training.read_loss_weight`): the targets the chat pass-key
examples carry, the entry each target names (over every base, padded, with eviction), and the Trainer's use of it."""

from __future__ import annotations

import pytest
import torch
from conftest import BASES, base_config, memory_settings
from test_chat_passkey import CHAT_TEMPLATE, SEGMENT  # byte tokens, a chat template of tags

import hf_memlm
from hf_memlm.data import build_tokenizer, make_chat_passkey_dataset
from hf_memlm.memory_base import split_heads
from hf_memlm.memory_hooks import record_reads
from hf_memlm.training.collate import LabelledTailCollator
from hf_memlm.training.read_supervision import read_accuracy, read_supervision_loss, targeted_entries


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = build_tokenizer("byte")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def test_chat_passkey_targets_point_from_the_reply_to_the_asked_needles_key(tokenizer):
    examples = make_chat_passkey_dataset(tokenizer, 30, SEGMENT, 3, seed=2, named_share=0.7, max_needles=4)
    for example in examples:
        ids, targets, key = example["input_ids"], example["read_targets"], example["answer"]
        assert len(targets) == len(ids)
        queries = [column for column, target in enumerate(targets) if target >= 0]
        reply_start = example["question_start"] + example["prompt_length"]
        # one query per key token (a byte each), from the reply's token before the key's first digit
        assert len(queries) == len(key)
        assert queries == list(range(queries[0], queries[0] + len(key)))
        assert tokenizer.decode(ids[queries[0] + 1 : queries[0] + 1 + len(key)]) == key
        assert queries[0] >= reply_start
        needle = [targets[column] for column in queries]
        # each target is the same token, in the document, in the asked needle (not another needle's)
        assert all(ids[target] == ids[column + 1] for column, target in zip(queries, needle))
        assert max(needle) < example["question_start"]
        asked = f"of the {example['key_name']} is " if example["key_name"] else "The pass key is "
        assert tokenizer.decode(ids[needle[0] - len(asked) : needle[0]]) == asked


def test_the_collator_pads_read_targets_with_ignored_columns(tokenizer):
    examples = make_chat_passkey_dataset(tokenizer, 3, SEGMENT, 3, seed=1, named_share=1.0, max_needles=2)
    features = [examples[i] for i in range(3)]
    batch = LabelledTailCollator(pad_token_id=0, read_targets=True)(features)
    assert batch["read_targets"].shape == batch["input_ids"].shape
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        assert batch["read_targets"][row, :length].tolist() == feature["read_targets"]
        assert (batch["read_targets"][row, length:] == -100).all()
    # by default they are left out (the model's forward takes no such argument), and asked for, they must be there
    assert "read_targets" not in LabelledTailCollator(pad_token_id=0)(features)
    plain = [{k: f[k] for k in ("input_ids", "labels")} for f in features]
    with pytest.raises(ValueError, match="needs examples with a read_targets column"):
        LabelledTailCollator(pad_token_id=0, read_targets=True)(plain)


def _kv_model(model_type: str, shift: int):
    torch.manual_seed(0)
    settings = memory_settings("kv", memory_value_shift=shift)  # 12 entries: early targets are evicted
    config = hf_memlm.MemLMConfig(text_config=base_config(model_type), **settings)
    model = hf_memlm.MemLMForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.memory_blocks.parameters():
            param.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("shift", [1, 0])
@pytest.mark.parametrize("model_type", list(BASES))
def test_each_target_names_the_entry_that_holds_its_tokens_value(model_type, shift):
    """Left padding of 5 and 0 (not multiples of the 8-token segment), 12 entries of memory: every target still
    in memory names the entry holding that token's value; evicted ones and the same segment's are left out."""
    model = _kv_model(model_type, shift)
    generator = torch.Generator().manual_seed(1)
    lengths, width = [27, 32], 32
    input_ids = torch.randint(3, 90, (2, width), generator=generator)
    mask = torch.zeros(2, width, dtype=torch.long)
    targets = torch.full((2, width), -100)
    for row, length in enumerate(lengths):
        pad = width - length
        mask[row, pad:] = 1
        # from the last 11 tokens, targets 3 to 17 tokens back: stored, evicted, or in the query's own segment
        for column in range(width - 11, width):
            targets[row, column] = max(pad, column - 3 - (column * 5) % 15)
    block = model.memory_blocks["0"]
    with record_reads() as records:
        model(input_ids=input_ids, attention_mask=mask)
    checked = skipped = 0
    for record in records:
        found = targeted_entries(record, targets, mask).get(0)
        targeted = int((targets.gather(1, record.source).masked_fill(~record.mask, -100) >= 0).sum())
        skipped += targeted - (0 if found is None else len(found[0]))
        for row, column, entry in zip(*found) if found else ():
            target = int(targets[row, record.source[row, column]])
            # the recorded segment that ran the target token, and the value the write made of it
            place = next(r for r in records if bool(((r.source[row] == target) & r.mask[row]).any()))
            at = int(((place.source[row] == target) & place.mask[row]).nonzero()[0])
            hidden = place.captured[0][row, at]
            expected = split_heads(block.mem_value(hidden)[None, None], block.num_heads)[0, :, 0]
            stored = record.layers[0]["values"][row, :, entry]
            torch.testing.assert_close(stored.float(), expected.float())
            checked += 1
    assert checked >= 10 and skipped >= 4  # both kinds happen: the test can fail either way


def test_the_read_loss_and_accuracy_cover_the_targets_and_reach_the_key_and_query_weights(tokenizer):
    from conftest import tiny_chat_kv_model

    torch.manual_seed(0)
    model = tiny_chat_kv_model(tokenizer, SEGMENT, memory_size=4096).train()
    examples = make_chat_passkey_dataset(tokenizer, 2, SEGMENT, 3, seed=3, named_share=1.0, max_needles=3)
    batch = LabelledTailCollator(pad_token_id=0, read_targets=True)([examples[0], examples[1]])
    targets = batch.pop("read_targets")
    with record_reads() as records:
        model(**batch)
    loss = read_supervision_loss(records, targets, batch["attention_mask"])
    accuracy = read_accuracy(records, targets, batch["attention_mask"])
    assert loss is not None and torch.isfinite(loss) and loss > 0
    assert 0.0 <= accuracy <= 1.0
    loss.backward()
    block = model.memory_blocks["0"]
    assert block.mem_key.weight.grad.abs().sum() > 0 and block.mem_query.weight.grad.abs().sum() > 0
    assert block.mem_out.weight.grad is None or block.mem_out.weight.grad.abs().sum() == 0  # not in the read's scores
    # no target in memory: nothing to learn from
    with record_reads() as records:
        model(**batch)
    assert read_supervision_loss(records, torch.full_like(targets, -100), batch["attention_mask"]) is None
    outside = targets.masked_fill(targets >= 0, targets.shape[1] + 3)
    with pytest.raises(ValueError, match="a target is the column of an earlier token"):
        read_supervision_loss(records, outside, batch["attention_mask"])


def test_the_read_loss_refuses_a_memory_without_entries():
    torch.manual_seed(0)
    config = hf_memlm.MemLMConfig(text_config=base_config("llama"), **memory_settings("slot"))
    model = hf_memlm.MemLMForCausalLM(config)
    input_ids = torch.randint(3, 90, (1, 24))
    targets = torch.full((1, 24), -100)
    targets[0, 20] = 3
    with record_reads() as records:
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match="read_loss_weight 0"):
        read_supervision_loss(records, targets)


def test_a_compiled_model_or_a_disabled_memory_records_nothing_and_the_trainer_says_so(tokenizer, tmp_path):
    from conftest import tiny_chat_kv_model

    from hf_memlm.training import MemLMTrainer, MemLMTrainingArguments

    model = tiny_chat_kv_model(tokenizer, SEGMENT, memory_size=4096)
    examples = make_chat_passkey_dataset(tokenizer, 2, SEGMENT, 3, seed=3, named_share=1.0, max_needles=2)
    batch = LabelledTailCollator(pad_token_id=0, read_targets=True)([examples[0], examples[1]])
    inputs = {k: v for k, v in batch.items() if k != "read_targets"}
    torch._dynamo.reset()
    with record_reads() as records:
        torch.compile(model, backend="eager")(**inputs)
    assert records == []
    args = MemLMTrainingArguments(output_dir=str(tmp_path), read_loss_weight=1.0, use_cpu=True, report_to="none")
    trainer = MemLMTrainer(model=model.train(), args=args)
    with model.disable_memory(), pytest.raises(ValueError, match="set torch_compile false, or read_loss_weight 0"):
        trainer.compute_loss(model, dict(batch))


def test_a_task_without_read_targets_refuses_the_read_loss_before_writing(tmp_path):
    from pathlib import Path

    from hf_memlm.recipes.config import load_train_config
    from hf_memlm.recipes.train import prepare_run

    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    out = tmp_path / "run"
    args = ["--output_dir", str(out), "--training.read_loss_weight", "1.0"]
    with pytest.raises(ValueError, match=r"data\.task 'text' gives none"):
        prepare_run(load_train_config(config, args))
    assert not out.exists()


def test_recording_is_off_outside_the_block():
    model = _kv_model("llama", 1)
    with record_reads() as records:
        pass
    model(input_ids=torch.randint(3, 90, (1, 24)))
    assert records == []


def _train_one_step(tokenizer, tmp_path, examples, **arguments):
    from conftest import tiny_chat_kv_model

    from hf_memlm.training import MemLMTrainer, MemLMTrainingArguments

    torch.manual_seed(0)
    model = tiny_chat_kv_model(tokenizer, SEGMENT, memory_size=4096)
    settings = dict(max_steps=1, learning_rate=0.5, optim="sgd", logging_steps=1, save_strategy="no")
    settings.update(report_to="none", use_cpu=True, seed=0, per_device_train_batch_size=2)
    args = MemLMTrainingArguments(output_dir=str(tmp_path / "run"), **{**settings, **arguments})
    collator = LabelledTailCollator(0, read_targets=args.read_loss_weight > 0)
    trainer = MemLMTrainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    trainer.train()
    logs = next(log for log in trainer.state.log_history if "loss" in log)
    return model.memory_blocks["0"].state_dict(), logs


def test_the_trainer_adds_the_read_loss_logs_it_and_scales_it_for_accumulation(tokenizer, tmp_path):
    examples = make_chat_passkey_dataset(tokenizer, 2, SEGMENT, 3, seed=4, named_share=1.0, max_needles=3)
    plain, plain_logs = _train_one_step(tokenizer, tmp_path, examples)
    read, read_logs = _train_one_step(tokenizer, tmp_path, examples, read_loss_weight=1.0)
    assert "read_loss" not in plain_logs and read_logs["read_loss"] > 0 and 0 <= read_logs["read_accuracy"] <= 1
    # the read loss moves the key projection further than the reply's loss alone does
    assert not torch.allclose(plain["mem_key.weight"], read["mem_key.weight"])
    # two examples in one batch, or one per batch accumulated over two: the same step
    accumulated, _ = _train_one_step(
        tokenizer,
        tmp_path,
        examples,
        read_loss_weight=1.0,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
    )
    for name, tensor in read.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_a_negative_read_loss_weight_is_refused(tmp_path):
    from hf_memlm.training import MemLMTrainingArguments

    with pytest.raises(ValueError, match=r"read_loss_weight=-1\.0 must be a finite number >= 0"):
        MemLMTrainingArguments(output_dir=str(tmp_path), read_loss_weight=-1.0, use_cpu=True, report_to="none")


def test_the_suites_examples_train_with_the_read_loss(tokenizer, tmp_path):
    # chat_suite's read_targets (RULER's values) feed the same loss: it is logged, and moves the key projection
    from test_chat_suite import BOOK

    from hf_memlm.data import make_chat_suite_dataset

    examples = make_chat_suite_dataset(tokenizer, 2, SEGMENT, 3, seed=0, text=BOOK, tasks=["niah_multivalue"])
    plain, _ = _train_one_step(tokenizer, tmp_path, examples)
    read, logs = _train_one_step(tokenizer, tmp_path, examples, read_loss_weight=1.0)
    assert logs["read_loss"] > 0 and 0 <= logs["read_accuracy"] <= 1
    assert not torch.allclose(plain["mem_key.weight"], read["mem_key.weight"])
