"""Train a tiny memory LM from scratch on the fact-update or recall task and score it by distance and by
number of updates (update) or of pairs written (recall), with memory and with memory disabled.

    PYTHONPATH=$PWD python scripts/compare_memory_kinds.py --kind slot --task update --out slot_update.json
    PYTHONPATH=$PWD python scripts/compare_memory_kinds.py --summarize slot_update.json   # the tables again

Same model as configs/passkey_cpu.yaml (2-layer, 64-wide Llama, byte tokens, segments of 64, memory beside
layer 0, AdamW 2e-3 / memory 6e-3, beta2 0.98, 20 warm-up steps). Exact match is teacher-forced: every answer
token is the argmax given the true text before it (= greedy generation of the answer).

update: trains on 6-segment examples (2 people, 2-3 moves each); evaluates on 5 segments (2 people, 2-3
moves) and 9 and 17 segments (3 people, 2-5 moves). recall: trains on 4-segment examples with 1-16 pairs
" ab:12" (two-letter keys, two-digit values; 10 fit in a segment) written from segment 0 on and 4 queries at the
end; evaluates 1..32 pairs at 5 and 17 segments. Neither kind learns these multi-token keys in 300 steps (the
key's letters have to reach the memory layer's input at the ":"). scripts/recall_capacity.py measures recall
as a capacity curve with one-token keys (" K7"), which both kinds learn, and with two-letter keys (" ab:7",
--key-length 2), learnt with more steps on a curriculum.
"""

import argparse
import collections
import json
import time

import numpy as np
import torch

from hf_memlm import MemLMConfig, MemLMForCausalLM
from hf_memlm.data import build_tokenizer, make_recall_dataset, make_update_dataset, tokenizer_size
from hf_memlm.recipes.defaults import tiny_llama_config

p = argparse.ArgumentParser()
p.add_argument("--kind", default="slot")
p.add_argument("--slots", type=int, default=256)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--task", default="update")
p.add_argument("--train_segments", type=int, default=6)
p.add_argument("--neval", type=int, default=60)
p.add_argument("--out", help="where the results go (JSON)")
p.add_argument("--layers", default="0")
p.add_argument("--summarize", nargs="*", help="print the tables of saved --out files, train nothing")
a = p.parse_args()


def distance_bucket(distance):
    return "1" if distance == 1 else "2-4" if distance <= 4 else "5-16"


def table(results, key):
    agg = collections.defaultdict(lambda: [0, 0, 0])
    for r in results["rows"]:
        r = dict(r, distance=distance_bucket(r["distance"]))
        k = tuple(r[x] for x in key)
        agg[k][0] += 1
        agg[k][1] += r["on"]
        agg[k][2] += r["off"]
    for k in sorted(agg):
        n, on, off = agg[k]
        print(
            results["kind"], results["slots"], key, k, f"n={n} with memory={on / n:.2f} memory disabled={off / n:.2f}"
        )


def report(results):
    if results["task"] == "update":
        table(results, ["distance"])
        table(results, ["updates"])
    else:
        table(results, ["segments", "pairs"])


if a.summarize:
    for path in a.summarize:
        with open(path) as handle:
            report(json.load(handle))
    raise SystemExit(0)
if not a.out:
    p.error("--out is required (or --summarize FILE...)")
torch.set_num_threads(1)
torch.manual_seed(0)
tok = build_tokenizer("byte")
text = tiny_llama_config(tokenizer_size(tok), max_positions=256)  # the main job's 2-layer, 64-wide Llama
cfg = MemLMConfig(
    text_config=text,
    memory_type=a.kind,
    memory_layers=[int(x) for x in a.layers.split(",")],
    segment_length=64,
    memory_heads=4,
    memory_value_shift=1,
    **{"kv": dict(memory_size=2048, memory_topk=None), "slot": dict(num_slots=a.slots)}[a.kind],
)
m = MemLMForCausalLM(cfg)


def data(n, segs, seed, **kw):
    if a.task == "update":
        return make_update_dataset(tok, n, 64, segs, seed=seed, **kw)
    return make_recall_dataset(tok, n, 64, segs, seed=seed, **kw)


if a.task == "update":
    train = data(a.steps * a.batch, a.train_segments, 0, num_entities=2, min_updates=2, max_updates=3)
else:
    train = None
mem = [q for n, q in m.named_parameters() if n.startswith("memory_blocks")]
rest = [q for n, q in m.named_parameters() if not n.startswith("memory_blocks")]
opt = torch.optim.AdamW(
    [{"params": rest, "lr": 2e-3}, {"params": mem, "lr": 6e-3}], betas=(0.9, 0.98), weight_decay=0.0
)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
t0 = time.time()
run = 0
rng = np.random.default_rng(0)
for step in range(a.steps):
    m.train()
    if train is not None:
        rows = train[step * a.batch : (step + 1) * a.batch]
    else:  # recall: 1..16 pairs written from segment 0 of 4, 4 queries
        npairs = int(rng.integers(1, 17))
        options = dict(num_queries=min(4, npairs), write_segments=-(-npairs // 10), value_length=2)
        rows = data(a.batch, 4, 10_000 + step, num_pairs=npairs, **options)[:]
    ids, lab = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])
    loss = m(ids, labels=lab).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    sched.step()
    run = 0.9 * run + 0.1 * loss.item() if step else loss.item()
    if (step + 1) % 25 == 0:
        print(f"step {step + 1} loss {run:.3f} t {time.time() - t0:.0f}s", flush=True)
m.eval()


def answers_correct(ds, enabled):
    out = []
    for i in range(0, len(ds), 20):
        rows = ds[i : i + 20]
        ids, lab = torch.tensor(rows["input_ids"]), torch.tensor(rows["labels"])
        with torch.no_grad():
            if enabled:
                logits = m(ids).logits
            else:
                with m.memory_disabled():
                    logits = m(ids).logits
        pred = logits[:, :-1].argmax(-1)
        lab = lab[:, 1:]
        for r in range(ids.shape[0]):
            starts = rows["answer_start"][r]
            lens = rows["answer_length"][r]
            if not isinstance(starts, list):
                starts, lens = [starts], [lens]
            out.append(
                [bool((pred[r, s - 1 : s - 1 + n] == lab[r, s - 1 : s - 1 + n]).all()) for s, n in zip(starts, lens)]
            )
    return out


results = {"kind": a.kind, "slots": a.slots, "task": a.task, "steps": a.steps, "train_time_s": time.time() - t0}
results["rows"] = []
grid = []
if a.task == "update":
    for segs in (5, 9, 17):
        many = segs >= 9
        options = dict(num_entities=3 if many else 2, min_updates=2, max_updates=5 if many else 3)
        grid.append((segs, {}, data(a.neval, segs, 1000 + segs, **options)))
else:
    for segs in (5, 17):
        for npairs in (1, 2, 4, 8, 16, 32):
            # 10 pairs " ab:12" fit in a segment of 64 tokens: more pairs take more segments
            options = dict(
                num_pairs=npairs, num_queries=min(4, npairs), write_segments=-(-npairs // 10), value_length=2
            )
            grid.append((segs, {"pairs": npairs}, data(a.neval, segs, 2000 + segs * 100 + npairs, **options)))
for segs, extra, ds in grid:
    on, off = answers_correct(ds, True), answers_correct(ds, False)
    for r in range(len(ds)):
        row = ds[r]
        d = row["distance_segments"]
        d = d if isinstance(d, list) else [d] * len(on[r])
        for q in range(len(on[r])):
            results["rows"].append(
                dict(segments=segs, distance=d[q], updates=row.get("num_updates"), on=on[r][q], off=off[r][q], **extra)
            )
json.dump(results, open(a.out, "w"))


report(results)
