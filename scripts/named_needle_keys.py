"""Can a read tell 4 named needles apart? Key and query projections fitted directly on SmolLM2's states.

Among 4 named needles ("The pass key of the blue door is 48213.") the config's memory answers another needle's
key two times in three (docs/results/smollm2_passkey.md). This script asks whether that is the states' fault or
the training's: it collects, at the memory layer's output, the state of the token before each needle's first digit
(the key of the entry that holds that digit, with value shift 1), the state of the reply's token before the asked
key's first digit (the read's query), and those of `--negatives` other document tokens, each with the `--window - 1`
tokens before it; then fits the read's shape (4 heads, cosine scores times a learned temperature) to pick the asked
needle's entry among the needles and the other tokens, on documents from the training books, and scores it on
documents from the held-out book.

    PYTHONPATH=$PWD python scripts/named_needle_keys.py --window 1     # keys from one token's state, as the config
    PYTHONPATH=$PWD python scripts/named_needle_keys.py --window 4     # a learned projection per token of 4

With `--window W` the key (and query) is a sum of W projections, one per token of the last W (a learned causal
convolution: initialised with the current token's projection only, so the fit starts where `--window 1` starts).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from smollm2_passkey_probe import key_starts  # (this folder is on sys.path when a script of it runs)

from hf_memlm.data import make_chat_passkey_dataset
from hf_memlm.integrations.gguf import load_base_tokenizer, resolve_base
from hf_memlm.memory_hooks import StopAfterCapture

BASE = "smollm2-135m-instruct"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=8, help="the memory's decoder layer (its output is read)")
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--train", type=int, default=300, help="training documents (4 named needles each)")
    parser.add_argument("--test", type=int, default=100, help="held-out documents")
    parser.add_argument("--negatives", type=int, default=64, help="other document tokens per document")
    parser.add_argument("--window", type=int, nargs="+", default=[1, 2, 4], help="tokens per key; one fit each")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-text", default="data/books/train/pride_and_prejudice.txt")
    parser.add_argument("--test-text", default="data/books/held_out/moby_dick.txt")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


class LayerOutput:
    """The base's first `layer + 1` decoder layers, returning the last one's output for one segment."""

    def __init__(self, model, layer: int):
        self.model = model
        self.layers = model.model.layers
        self.layer = layer
        self.captured = None
        self.layers[layer].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.captured = output[0] if isinstance(output, tuple) else output
        raise StopAfterCapture  # nothing above the memory layer is needed

    @torch.no_grad()
    def __call__(self, ids: list[int]) -> torch.Tensor:
        try:
            self.model(torch.tensor([ids]))
        except StopAfterCapture:
            pass
        return self.captured[0].float()


def collect(args, tokenizer, states, text_path: str, count: int, seed: int, window: int):
    text = open(text_path, encoding="utf-8").read()[:400_000]
    data = make_chat_passkey_dataset(
        tokenizer, count, args.segment, 4, seed=seed, text=text, named_share=1.0, min_needles=4, numbers=0
    )
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for example in data:
        ids = list(example["input_ids"])
        start = example["question_start"]
        document, question = ids[:start], ids[start:]
        key = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
        hidden = torch.cat([states(document[s : s + args.segment]) for s in range(0, start, args.segment)])
        starts = key_starts(tokenizer, document)
        keys = [tokenizer.decode(document[position : position + len(key)]).strip() for position in starts]
        if len(starts) != 4 or keys.count(example["answer"]) != 1:
            continue
        entry = [position - 1 for position in starts]  # the token before the first digit
        asked = keys.index(example["answer"])
        in_reply = next(i for i in range(len(question)) if question[i : i + len(key)] == key) - 1
        query_states = states(question)
        others = torch.randperm(start - window, generator=generator)[: args.negatives] + window
        others = [int(i) for i in others if int(i) not in entry]
        candidates = entry + others
        rows.append(
            {
                "query": _windowed(query_states, [in_reply], window),
                "keys": _windowed(hidden, candidates, window),
                "target": asked,
            }
        )
    return rows


def _windowed(hidden: torch.Tensor, positions: list[int], window: int) -> torch.Tensor:
    """(len(positions), window, width): each position's state and the `window - 1` before it (zeros before 0)."""
    padded = torch.cat([hidden.new_zeros(window - 1, hidden.shape[1]), hidden])
    return torch.stack([padded[p : p + window].flip(0) for p in positions])


class Read(torch.nn.Module):
    """The memory read's scoring: per head, the cosine of projected query and key times a learned temperature."""

    def __init__(self, width: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.query = torch.nn.Parameter(torch.zeros(window, width, width))
        self.key = torch.nn.Parameter(torch.zeros(window, width, width))
        torch.nn.init.normal_(self.query[0], std=0.02)
        with torch.no_grad():
            self.key[0].copy_(self.query[0])  # as the memory block starts: keys equal to queries
        self.log_scale = torch.nn.Parameter(torch.full((heads,), 16.0).log())

    def project(self, weight, states):  # states (..., window, width)
        out = torch.einsum("...wi,wio->...o", states, weight)
        return F.normalize(out.unflatten(-1, (self.heads, -1)), dim=-1)

    def forward(self, query, keys):  # (1, window, width), (N, window, width) -> scores (heads, N)
        q, k = self.project(self.query, query)[0], self.project(self.key, keys)
        return torch.einsum("hd,nhd->hn", q, k) * self.log_scale.exp()[:, None]


def evaluate(read, rows):
    """Share of (document, head) reads whose best entry is the asked needle's: among the needles, among all."""
    among_needles = overall = total = 0
    with torch.no_grad():
        for row in rows:
            scores = read(row["query"], row["keys"])
            among_needles += int((scores[:, :4].argmax(-1) == row["target"]).sum())
            overall += int((scores.argmax(-1) == row["target"]).sum())
            total += scores.shape[0]
    return among_needles / total, overall / total


def fit(args, train, test, window: int) -> None:
    torch.manual_seed(0)
    read = Read(train[0]["keys"].shape[-1], args.heads, window)
    print(
        f"window {window}: at init, asked needle best of the needles / of all: "
        f"train {evaluate(read, train)}, test {evaluate(read, test)}",
        flush=True,
    )
    optimizer = torch.optim.AdamW(read.parameters(), lr=args.lr, weight_decay=0.0)
    started = time.perf_counter()
    for step in range(args.steps):
        row = train[step % len(train)]
        scores = read(row["query"], row["keys"])
        loss = F.cross_entropy(scores, torch.full((args.heads,), row["target"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 100 == 0:
            print(
                f"  step {step + 1}: train {evaluate(read, train)}, test {evaluate(read, test)} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    tokenizer = load_base_tokenizer(BASE)
    folder, kwargs = resolve_base(BASE, {"dtype": torch.float32})
    states = LayerOutput(AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval(), args.layer)
    widest = max(args.window)
    started = time.perf_counter()
    train = collect(args, tokenizer, states, args.train_text, args.train, seed=0, window=widest)
    test = collect(args, tokenizer, states, args.test_text, args.test, seed=1, window=widest)
    print(
        f"{len(train)} training and {len(test)} held-out documents with 4 needles "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    for window in args.window:
        cut = [{**row, "query": row["query"][:, :window], "keys": row["keys"][:, :window]} for row in train]
        held = [{**row, "query": row["query"][:, :window], "keys": row["keys"][:, :window]} for row in test]
        fit(args, cut, held, window)


if __name__ == "__main__":
    main()
