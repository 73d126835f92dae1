"""How a pretrained base's perplexity beyond the 4th segment moves as its memory trains: the learning curve behind
configs/smollm2_lm_books_cpu.yaml (docs/results/smollm2_lm_books.md).

Wraps the base (default: the shipped SmolLM2-135M-Instruct GGUF) with a memory block, trains only the memory
with a plain AdamW loop (constant learning rate after a short warm-up) on data/books/train packed in document
order (examples drawn in a seeded random order), and every --eval-every steps scores the perplexity by segment
of --eval-examples windows of --eval-segments segments taken evenly over data/books/held_out, with the library's
`segment_nll`. Memory disabled is scored once: the memory's output projection starts at zero, so before training
and with memory disabled the model computes exactly what the base computes in windows of one segment.

    PYTHONPATH=$PWD python scripts/lm_memory_curve.py --layer 20 --steps 180 --eval-every 30 --out curve.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hf_memlm import MemLMForCausalLM
from hf_memlm.data import load_text_corpus, pack_documents
from hf_memlm.evaluation.comparison import segment_nll
from hf_memlm.integrations.gguf import load_base_tokenizer, resolve_base

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--kind", default="kv", choices=["kv", "slot"])
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--topk", type=int, default=32, help="kv: entries read per head")
    parser.add_argument("--train-segments", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--eval-examples", type=int, default=4)
    parser.add_argument("--eval-segments", type=int, default=8)
    parser.add_argument("--beyond", type=int, default=4, help="pool the segments from this index on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    base, base_kwargs = resolve_base(args.base, {"dtype": "float32"})
    tokenizer = load_base_tokenizer(args.base, {})
    memory = dict(memory_type=args.kind, memory_layers=[args.layer], segment_length=args.segment)
    memory["memory_heads"] = args.heads
    if args.kind == "kv":
        memory.update(memory_size=65536, memory_topk=args.topk, memory_value_shift=1, memory_search="exact")
    model = MemLMForCausalLM.from_base(base, base_kwargs=base_kwargs, **memory)
    trainable = [p for name, p in model.named_parameters() if name.startswith("memory_blocks.")]
    model.requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)

    train = pack_documents(load_text_corpus(ROOT / "data/books/train"), tokenizer, args.segment, args.train_segments)
    held = pack_documents(load_text_corpus(ROOT / "data/books/held_out"), tokenizer, args.segment, args.eval_segments)
    picked = torch.linspace(0, len(held) - 1, args.eval_examples).round().long().unique().tolist()
    rows = [list(row) for row in held.select(picked)["input_ids"]]

    def beyond(use_memory: bool) -> dict:
        sums, counts = segment_nll(model, rows, args.segment, use_memory=use_memory, batch_size=args.batch_size)
        pooled = sum(sums[args.beyond :]) / sum(counts[args.beyond :])
        return {"beyond": math.exp(pooled), "by_segment": [math.exp(s / c) for s, c in zip(sums, counts)]}

    started = time.perf_counter()
    disabled = beyond(False)
    curve = [{"step": 0, "tokens": 0, **disabled}]
    print(f"memory disabled (= the base in windows of {args.segment}): beyond {disabled['beyond']:.3f}", flush=True)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup)))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    model.train()
    losses = []
    for step in range(1, args.steps + 1):
        picks = [order[((step - 1) * args.batch_size + j) % len(order)] for j in range(args.batch_size)]
        ids = torch.tensor(train.select(picks)["input_ids"])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            point = beyond(True)
            point.update(step=step, tokens=step * ids.numel(), train_loss=sum(losses[-10:]) / len(losses[-10:]))
            point["gain_percent"] = 100.0 * (1.0 - point["beyond"] / disabled["beyond"])
            point["seconds"] = round(time.perf_counter() - started)
            curve.append(point)
            print(
                f"step {step}: train loss {point['train_loss']:.3f}, beyond {point['beyond']:.3f} "
                f"({point['gain_percent']:+.2f}% against memory disabled), {point['seconds']} s",
                flush=True,
            )
            model.train()
    result = {"settings": vars(args) | {"out": str(args.out) if args.out else None}, "curve": curve}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
