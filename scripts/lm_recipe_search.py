"""The recipe search behind configs/lm_books_cpu.yaml: one model, trained and scored in one short run.

Trains one model from scratch on data/books/train (random windows of --train_segments segments) with a plain
AdamW loop (warm-up, cosine decay), then scores perplexity by segment position on --neval windows of
--eval_segments segments taken evenly over data/books/held_out/moby_dick.txt. --mode memory trains the memory
model (and scores it with memory disabled too); nomem trains the same model inside memory_disabled() (its
base alone, reading each segment on its own: the equal-compute baseline); double the same with segments
twice as long. Runs of different modes with the same --seed start from the same base weights and see the same
windows in the same order, so their perplexities compare directly; the training of the recipe itself
(`hf-memlm train configs/lm_books_cpu.yaml`) repeats this over seeds with the Trainer.

    PYTHONPATH=$PWD python scripts/lm_recipe_search.py --mode memory --kind slot --tok bpe --out slot.json
    PYTHONPATH=$PWD python scripts/lm_recipe_search.py --mode nomem --tok bpe --out nomem.json
"""

import argparse
import contextlib
import json
import math
import time

import torch

from hf_memlm import MemLMConfig, MemLMForCausalLM
from hf_memlm.data import build_tokenizer, tokenizer_size
from hf_memlm.recipes.defaults import tiny_llama_config

p = argparse.ArgumentParser()
p.add_argument("--mode", default="memory")  # memory | nomem | double
p.add_argument("--steps", type=int, default=300)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seg", type=int, default=64)
p.add_argument("--train_segments", type=int, default=8)
p.add_argument("--eval_segments", type=int, default=16)
p.add_argument("--neval", type=int, default=32)
p.add_argument("--hidden", type=int, default=64)
p.add_argument("--layers", type=int, default=2)
p.add_argument("--mem_layer", type=str, default="0", help="memory layers, comma-separated")
p.add_argument("--topk", type=int, default=0)
p.add_argument("--shift", type=int, default=1)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--mem_lr", type=float, default=3e-3)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--kind", default="kv")
p.add_argument("--bptt", type=int, default=0)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out")
p.add_argument("--tok", default="byte")
p.add_argument("--vocab", type=int, default=2048)
p.add_argument("--wd", type=float, default=0.1)
p.add_argument("--slots", type=int, default=256)
p.add_argument("--mhd", type=int, default=0)
p.add_argument("--mheads", type=int, default=4)
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
D = "data/books/"
train_text = [open(D + "train/pride_and_prejudice.txt").read(), open(D + "train/tinyshakespeare.txt").read()]
held = open(D + "held_out/moby_dick.txt").read()
tok = build_tokenizer("byte") if a.tok == "byte" else build_tokenizer("bpe", texts=train_text, vocab_size=a.vocab)
V = tokenizer_size(tok)
seg = a.seg * (2 if a.mode == "double" else 1)
text_config = tiny_llama_config(V, hidden_size=a.hidden, num_layers=a.layers, max_positions=2 * a.seg + 8)
cfg = MemLMConfig(
    text_config=text_config,
    memory_type=a.kind,
    memory_layers=[int(x) for x in a.mem_layer.split(",")],
    segment_length=seg,
    memory_heads=a.mheads,
    memory_head_dim=a.mhd or None,
    memory_size=4096,
    memory_topk=a.topk or None,
    memory_value_shift=a.shift,
    bptt_segments=a.bptt or None,
    **({"num_slots": a.slots} if a.kind == "slot" else {}),
)
model = MemLMForCausalLM(cfg)
ids = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"]) for t in train_text]
L = a.seg * a.train_segments
windows = torch.cat([x[: len(x) // L * L].view(-1, L) for x in ids])
hid = torch.tensor(tok(held, add_special_tokens=False)["input_ids"])
EL = a.seg * a.eval_segments
evalw = hid[: len(hid) // EL * EL].view(-1, EL)
step_idx = torch.linspace(0, len(evalw) - 1, a.neval).long()
evalw = evalw[step_idx]
mem_ids = {id(p) for n, p in model.named_parameters() if "memory" in n}
groups = [
    {"params": [p for p in model.parameters() if id(p) not in mem_ids], "lr": a.lr},
    {"params": [p for p in model.parameters() if id(p) in mem_ids], "lr": a.mem_lr},
]
opt = torch.optim.AdamW(groups, weight_decay=a.wd, betas=(0.9, 0.98))
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda s: min(1, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))
)
g = torch.Generator().manual_seed(a.seed)
ctx = model.memory_disabled if a.mode != "memory" else contextlib.nullcontext
print(
    f"{len(windows)} train windows of {L}; {len(windows) * L / 1e6:.2f}M tokens; steps*batch*L={a.steps * a.batch * L / 1e6:.2f}M",
    flush=True,
)
t0 = time.time()
model.train()
for step in range(a.steps):
    b = windows[torch.randint(len(windows), (a.batch,), generator=g)]
    with ctx():
        loss = model(input_ids=b, labels=b).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    if step % 50 == 0 or step == a.steps - 1:
        print(step, round(loss.item(), 4), round(time.time() - t0, 1), flush=True)
train_s = time.time() - t0
model.eval()


def evaluate(ctx):
    nll = torch.zeros(a.eval_segments)
    cnt = torch.zeros(a.eval_segments)
    with torch.no_grad(), ctx():
        for i in range(0, len(evalw), 8):
            b = evalw[i : i + 8]
            logits = model(input_ids=b).logits
            lp = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, V), b[:, 1:].reshape(-1), reduction="none"
            ).view(len(b), -1)
            pos = torch.arange(0, EL - 1) // a.seg
            nll.index_add_(0, pos, lp.sum(0))
            cnt.index_add_(0, pos, torch.full((EL - 1,), float(len(b))))
    return nll, cnt


nll, cnt = evaluate(ctx)
if a.mode == "memory":
    dn, dc = evaluate(model.memory_disabled)
    print(
        "memory disabled ppl by seg",
        [round(x, 3) for x in (dn / dc).exp().tolist()],
        "beyond4",
        round(math.exp((dn[4:].sum() / dc[4:].sum()).item()), 4),
    )
ppl = (nll / cnt).exp()
res = {
    "args": vars(a),
    "train_s": train_s,
    "ppl": ppl.tolist(),
    "ppl_beyond4": math.exp((nll[4:].sum() / cnt[4:].sum()).item()),
}
print(
    a.mode,
    "train_s",
    round(train_s),
    "ppl by seg",
    [round(x, 3) for x in ppl.tolist()],
    "beyond4",
    round(res["ppl_beyond4"], 4),
    flush=True,
)
if a.out:
    json.dump(res, open(a.out, "w"))
