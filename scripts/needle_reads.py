"""Where the question's read looks among a document's entries: the pass-key needles' entries against the rest.

    PYTHONPATH=$PWD python scripts/needle_reads.py                        # SmolLM2 wrapped fresh, as training starts
    PYTHONPATH=$PWD python scripts/needle_reads.py --key-window 4         # ... with keys from 4 tokens
    PYTHONPATH=$PWD python scripts/needle_reads.py --model outputs/smollm2_passkey_cpu   # a trained folder

Examples as `make_chat_passkey_dataset` builds them from the training books (3 segments of document, here always 4
named needles, one asked), read into memory; then the question and reply run, and the read at the token before the
key's first digit is scored over every entry of the document (exact, cosine times the head's temperature). With
value shift 1 the entry that holds the key's first digit is the one of the space before it ("... door is| 48213").
Prints, over examples and heads: how often the asked needle's entry scores highest of the 4 needles' (chance 0.25),
and the softmax weight on it and on all 4 needles' entries.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_memlm import MemLMForCausalLM, calibrate_memory
from hf_memlm.data.chat_passkey import make_chat_passkey_dataset
from hf_memlm.integrations.gguf import load_base_tokenizer, resolve_base
from hf_memlm.memory_base import key_window_mean, split_heads

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a saved memory model folder (default: SmolLM2 wrapped fresh)")
    parser.add_argument("--layer", type=int, default=8, help="fresh model: the memory layer")
    parser.add_argument("--key-window", type=int, default=1, help="fresh model: memory_key_window")
    parser.add_argument("--calibrate", action="store_true", help="fresh model: calibrate_memory on 4 examples first")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = load_base_tokenizer("smollm2-135m-instruct")
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        folder, kwargs = resolve_base("smollm2-135m-instruct", {"dtype": torch.float32})
        model = MemLMForCausalLM.from_base(
            folder,
            base_kwargs=kwargs,
            memory_type="kv",
            memory_layers=[args.layer],
            segment_length=256,
            memory_heads=4,
            memory_size=65536,
            memory_key_window=args.key_window,
        )
    model.eval()
    text = "\n".join(path.read_text(encoding="utf-8") for path in sorted((ROOT / "data/books/train").glob("*.txt")))
    examples = make_chat_passkey_dataset(
        tokenizer, args.examples, 256, 4, seed=args.seed, text=text, named_share=1.0, min_needles=4, max_needles=4
    )
    if args.calibrate and not args.model:
        width = min(e["question_start"] for e in examples.select(range(4)))
        calibrate_memory(model, torch.tensor([e["input_ids"][:width] for e in examples.select(range(4))]))
    layer = model.config.memory_layers[0]
    block = model.memory_blocks[str(layer)]
    window = model.config.memory_key_window
    first_best, asked_weight, needles_weight, count = 0, 0.0, 0.0, 0
    for example in examples:
        ids, start = example["input_ids"], example["question_start"]
        hidden = _layer_states(model, layer, ids, start)
        question, document = hidden["question"], hidden["document"]
        digit = next(
            i
            for i in range(start, len(ids))
            if example["labels"][i] != -100 and tokenizer.decode([ids[i]]).strip().isdigit()
        )
        query_at = digit - 1 - start
        queries = F.normalize(
            split_heads(
                block.mem_query(key_window_mean(question, window)[:, query_at : query_at + 1]), block.num_heads
            ),
            dim=-1,
        )[0, :, 0]
        keys = F.normalize(split_heads(block.mem_key(document), block.num_heads), dim=-1)[0]
        scores = torch.einsum("hd,hnd->hn", queries, keys) * block.log_scale.exp()[:, None]
        needles = _needle_entries(tokenizer, ids[:start])
        asked = [p for p, key in needles.items() if key == example["answer"]]
        weights = torch.softmax(scores, -1)
        for head in range(block.num_heads):
            best = max(needles, key=lambda p: float(scores[head, p]))
            first_best += best in asked
            asked_weight += float(weights[head, asked].sum())
            needles_weight += float(weights[head, list(needles)].sum())
            count += 1
    print(f"memory layer {layer}, key window {window}, {args.examples} examples x {block.num_heads} heads")
    print(f"  asked needle scores highest of the 4 needles: {first_best / count:.2f} (chance 0.25)")
    print(
        f"  softmax weight on the asked needle's entry: {asked_weight / count:.3f}; on all 4: {needles_weight / count:.3f}"
    )


@torch.no_grad()
def _layer_states(model, layer: int, ids: list[int], start: int) -> dict[str, torch.Tensor]:
    """The memory layer's hidden states: the document's, segment by segment (keys are made within a segment), and
    the question segment's (the document read into memory first)."""
    block = model.memory_blocks[str(layer)]
    segment = model.config.segment_length
    captured = []
    write = block.write

    def keep(hidden_states, mask, *args, **kwargs):
        captured.append(hidden_states)
        return write(hidden_states, mask, *args, **kwargs)

    block.write = keep
    try:
        state = model.memorize(torch.tensor([ids[:start]]))
        model(torch.tensor([ids[start:]]), memory_state=state)
    finally:
        del block.write
    window = model.config.memory_key_window
    # memorize writes the document in one call (key window 1) or segment by segment; the question comes last
    document = torch.cat([key_window_mean(h, window) for h in captured[:-1]], dim=1)
    assert document.shape[1] == start and start % segment == 0
    return {"document": document, "question": captured[-1]}


def _needle_entries(tokenizer, document: list[int]) -> dict[int, str]:
    """{entry index: key} for each needle: the entry of the space token before the key (value shift 1: entry j
    holds token j's key, stored with token j + 1's value)."""
    found = {}
    for position in range(1, len(document) - 6):
        if tokenizer.decode(document[position - 1 : position + 1]) == " is " and "pass key" in tokenizer.decode(
            document[max(0, position - 10) : position]
        ):
            found[position] = tokenizer.decode(document[position + 1 : position + 6])
    return found


if __name__ == "__main__":
    main()
