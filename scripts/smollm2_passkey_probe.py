"""Short memory fine-tunings of SmolLM2-135M-Instruct on chat pass keys: the probe behind
docs/results/smollm2_passkey.md.

    PYTHONPATH=$PWD python scripts/smollm2_passkey_probe.py --layer 8 --topk 32 --steps 60
    PYTHONPATH=$PWD python scripts/smollm2_passkey_probe.py --layer 8 --ranks 12   # the read at init only

Trains only the memory block (base frozen) on `make_chat_passkey_dataset` examples (or the plain-text passkey
task, `--task text`) with AdamW, batches of 4, the loss on the reply, and prints the loss every 10 steps;
then the per-token loss of the reply on 4 held-out examples, with memory and with memory disabled (which says
whether the digits, not only the reply's wording, come from memory). `--ranks N`: for N examples, the rank of
the entry holding the key's first digit among all entries, per head, for the query of the reply's token before
it, with the memory as initialised (0: the read's best pick is the right entry); then, over the examples with
several named needles and every head, how often the asked needle's entry scores highest of the needles' entries,
and the softmax weight the read puts on it and on all the needles' entries:

    PYTHONPATH=$PWD python scripts/smollm2_passkey_probe.py --ranks 16 --named-share 1 --min-needles 4 --heads 4
    PYTHONPATH=$PWD python scripts/smollm2_passkey_probe.py --ranks 16 --named-share 1 --min-needles 4 --heads 4 \
        --key-window 4                     # keys and queries from the mean of 4 tokens (memory_key_window)
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_memlm import MemLMForCausalLM
from hf_memlm.data import make_chat_passkey_dataset, make_passkey_dataset
from hf_memlm.integrations.gguf import load_base_tokenizer, resolve_base
from hf_memlm.training import calibrate_memory, load_memory_from
from hf_memlm.training.collate import LabelledTailCollator

BASE = "smollm2-135m-instruct"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=8, help="decoder layer the memory sits beside")
    parser.add_argument("--segment", type=int, default=256, help="segment_length")
    parser.add_argument("--segments", type=int, default=4, help="segments per example (the last asks)")
    parser.add_argument("--topk", type=int, default=32, help="memory_topk in training")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="memory_dtype")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--task", choices=["chat", "text"], default="chat")
    parser.add_argument("--named-share", type=float, default=0.5)
    parser.add_argument("--min-needles", type=int, default=1, help="named examples: fewest needles (of 4)")
    parser.add_argument(
        "--numbers", type=int, nargs="+", default=[0], help="book-like numbers per document (counts to draw from)"
    )
    parser.add_argument("--key-window", type=int, default=1, help="memory_key_window")
    parser.add_argument(
        "--key-projections", default="shared", choices=["shared", "per_token"], help="memory_key_projections"
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="a trained folder of the same memory layer and heads: start from its memory weights (weights it lacks, "
        "such as per-token key projections, keep their initialisation: zero)",
    )
    parser.add_argument(
        "--train-new-only", action="store_true", help="with --init-from: train only the weights it lacks"
    )
    parser.add_argument("--save", default=None, help="save the trained model and tokenizer here")
    parser.add_argument(
        "--calibrate", action="store_true", help="calibrate_memory on 4 training documents before anything else"
    )
    parser.add_argument("--ranks", type=int, default=0, help="only report the read's ranks at init for N examples")
    parser.add_argument("--data", default="data/books/train/pride_and_prejudice.txt")
    parser.add_argument("--chars", type=int, default=400_000, help="characters of --data used as the documents")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(args):
    folder, kwargs = resolve_base(BASE, {"dtype": torch.float32})
    torch.manual_seed(args.seed)
    model = MemLMForCausalLM.from_base(
        folder,
        base_kwargs=kwargs,
        memory_type="kv",
        memory_layers=[args.layer],
        segment_length=args.segment,
        memory_heads=args.heads,
        memory_topk=args.topk,
        memory_size=100_000,
        memory_search="exact",
        memory_dtype=args.dtype,
        memory_value_shift=1,
        memory_key_window=args.key_window,
        memory_key_projections=args.key_projections,
    )
    new = []
    if args.init_from:
        new = load_memory_from(model, args.init_from)
        print(f"memory weights from {args.init_from}; new here: {new}", flush=True)
    for name, param in model.named_parameters():
        param.requires_grad = name in new if args.train_new_only else name.startswith("memory_blocks.")
    return model


def calibrate(args, model, tokenizer) -> None:
    documents = examples(args, tokenizer, 4, seed=args.seed + 1)
    start = min(example.get("question_start", (args.segments - 1) * args.segment) for example in documents)
    spread = calibrate_memory(model, torch.tensor([example["input_ids"][:start] for example in documents]))
    print(f"calibrated: the largest feature RMS is {spread[args.layer]:.0f} times the median", flush=True)


def examples(args, tokenizer, count: int, seed: int):
    text = open(args.data, encoding="utf-8").read()[: args.chars]
    if args.task == "text":
        return make_passkey_dataset(
            tokenizer, count, args.segment, args.segments, needle_segment=0, seed=seed, text=text
        )
    return make_chat_passkey_dataset(
        tokenizer,
        count,
        args.segment,
        args.segments,
        seed=seed,
        text=text,
        named_share=args.named_share,
        min_needles=args.min_needles,
        numbers=args.numbers,
    )


def read_ranks(args, model, tokenizer) -> None:
    block = model.memory_blocks[str(args.layer)]
    model.eval()
    best, asked_weight, needles_weight, reads = 0, 0.0, 0.0, 0
    for example in examples(args, tokenizer, args.ranks, seed=5):
        ids = torch.tensor(example["input_ids"])
        start = example["question_start"] if args.task == "chat" else (args.segments - 1) * args.segment
        document, question = ids[:start], ids[start:].tolist()
        state = model.memorize(document[None]).layers[args.layer]
        key = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
        written = document.tolist()
        first_digit = next(i for i in range(len(written)) if written[i : i + len(key)] == key)
        asked = next(i for i in range(len(question)) if question[i : i + len(key)] == key) - 1
        with torch.no_grad():
            hidden = model.language_model(torch.tensor([question]), output_hidden_states=True).hidden_states
            query = block.queries(hidden[args.layer + 1])[:, :, asked : asked + 1]  # the read's own queries
            scores = (query @ state["keys"].float().transpose(-1, -2))[0, :, 0]
        target = first_digit - 1  # with value shift 1 the entry holding that digit's value (the stream's first
        # token has no entry)
        ranks = (scores > scores[:, target : target + 1]).sum(-1).tolist()
        print(f"needles {example.get('num_needles', 1)}: rank of the right entry per head {ranks}", flush=True)
        needles = [i - 1 for i in key_starts(tokenizer, written)]  # every needle's entry of its first digit
        if len(needles) > 1:
            weights = torch.softmax(scores * block.log_scale.exp()[:, None], dim=-1)
            best += int((scores[:, needles].argmax(-1) == needles.index(target)).sum())
            asked_weight += float(weights[:, target].sum())
            needles_weight += float(weights[:, needles].sum())
            reads += block.num_heads
    if reads:
        print(
            f"{reads} reads among several needles: the asked needle's entry scores highest of the needles' "
            f"{best / reads:.2f}; the read's weight on it {asked_weight / reads:.3f}, on all the needles' "
            f"{needles_weight / reads:.3f}",
            flush=True,
        )


def key_starts(tokenizer, document: list[int]) -> list[int]:
    """Positions of the first digit of every needle's key ("The pass key ... is 48213.") in `document`."""
    starts = []
    for position in range(1, len(document)):
        before = tokenizer.decode(document[max(0, position - 12) : position])
        if tokenizer.decode(document[position : position + 1]).isdigit() and before.endswith(" is "):
            if "pass key" in before and not tokenizer.decode(document[position - 1 : position]).isdigit():
                starts.append(position)
    return starts


def reply_losses(model, batch) -> list[float]:
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[0], batch["labels"][0, -out.logits.shape[1] :]
    targets, kept = labels[1:], labels[1:] != -100
    log_probs = torch.log_softmax(logits[:-1], -1)
    return (-log_probs[kept].gather(-1, targets[kept][:, None])[:, 0]).tolist()


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = load_base_tokenizer(BASE)
    model = build(args)
    if args.calibrate:
        calibrate(args, model, tokenizer)
    if args.ranks:
        read_ranks(args, model, tokenizer)
        return
    train = examples(args, tokenizer, args.steps * args.batch, seed=args.seed)
    collate = LabelledTailCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(args.warmup, 1)))
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        batch = collate([train[i] for i in range(step * args.batch, (step + 1) * args.batch)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
    for example in examples(args, tokenizer, 4, seed=1000):
        batch = collate([example])
        with_memory = reply_losses(model, batch)
        with model.memory_disabled():
            disabled = reply_losses(model, batch)
        print("reply loss per token, with memory:  ", [round(v, 2) for v in with_memory])
        print("                      memory disabled:", [round(v, 2) for v in disabled], flush=True)


if __name__ == "__main__":
    main()
