"""What memory costs on a real pretrained model: SmolLM2-135M-Instruct with the memory of the real-model pass-key
config (read from `configs/smollm2_passkey_cpu.yaml`: `kv`, 4 heads, segments of 256), through the public API.

Figures (medians of the repetitions, models timed interleaved in one process):
  1. reading: `memorize` tokens/s of book text per dtype (float32, bfloat16), side by side on the same chunk;
  2. the long read: a book streamed into memory chunk by chunk up to `--tokens` (1M by default) in the fast dtype:
     tokens/s over the whole read, time per token of the whole read over that of its first chunk (flat cost),
     peak RSS of the process up to the end of the read (ru_maxrss: the model, the state and what reading used);
  3. generation with the long read in memory: new tokens/s over the base model generating from its window alone;
  4. a forward (inference) and a training step (forward + backward) with memory over the base model running
     each segment on its own; and the base model alone with one backward through all the segments (as a memory
     model's step back-propagates) over the same base segment by segment.

The process keeps freed memory for reuse (`hf_memlm.training.keep_freed_memory`, as `hf-memlm` and `MemLMTrainer` do);
`--default-malloc` leaves glibc's `malloc` as it is.

    python benchmarks/bench_real_model.py                                   # the shipped model, 1M tokens
    python benchmarks/bench_real_model.py --model outputs/smollm2_passkey_cpu  # a trained folder instead
    python benchmarks/bench_real_model.py --quick                           # a tiny Llama, seconds (CI smoke)

The memory weights are as built (or as trained with `--model`): time does not depend on their values.
"""

from __future__ import annotations

import argparse
import functools
import resource
import time
from pathlib import Path

import torch
import yaml
from common import base_config, environment, interleaved, markdown_table, median, report

from hf_memlm import MemLMForCausalLM, memory_kv_index
from hf_memlm.memory_settings import MEMORY_DTYPES
from hf_memlm.training import keep_freed_memory

PASSKEY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2_passkey_cpu.yaml"


def passkey_memory() -> dict:
    """The memory settings of configs/smollm2_passkey_cpu.yaml as its evaluation reloads them (its top-k reads), read
    from the config so that the figures time the memory the config trains; the size is each benchmark's own."""
    config = yaml.safe_load(PASSKEY_CONFIG.read_text())
    memory = {name: value for name, value in config["model"]["memory"].items() if name != "memory_size"}
    memory["memory_topk"] = config["evaluation"]["options"]["memory_topk"]
    return memory


PASSKEY_MEMORY = passkey_memory()


def load_model(args, memory_size: int):
    """The model to time: `--model` folder, the shipped SmolLM2 wrapped with PASSKEY_MEMORY, or (--quick) a tiny
    Llama; and its tokens of book text (a tokenizer's ids, or bytes for the tiny model)."""
    from transformers import AutoModelForCausalLM

    if args.quick:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(base_config(64, 4, 32))
        settings = dict(PASSKEY_MEMORY, memory_layers=[1], segment_length=32, memory_heads=2)
        settings.update(
            memory_search=args.search, memory_dtype=args.memory_dtype, memory_value_dtype=args.memory_value_dtype
        )
        return MemLMForCausalLM.from_base(base, memory_size=memory_size, **settings).eval(), None
    if args.model:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            args.model,
            memory_size=memory_size,
            memory_topk=4,
            memory_search=args.search,
            **({"memory_dtype": args.memory_dtype} if args.memory_dtype else {}),  # else the folder's
            **({"memory_value_dtype": args.memory_value_dtype} if args.memory_value_dtype else {}),
        )
        return model.eval(), AutoTokenizer.from_pretrained(args.model)
    from hf_memlm.integrations.gguf import load_base_tokenizer, resolve_base

    base, base_kwargs = resolve_base("smollm2-135m-instruct", {"dtype": "float32"})
    base_kwargs = {k: getattr(torch, v) if k == "dtype" else v for k, v in base_kwargs.items()}
    settings = dict(
        PASSKEY_MEMORY,
        memory_search=args.search,
        memory_dtype=args.memory_dtype,
        memory_value_dtype=args.memory_value_dtype,
    )
    model = MemLMForCausalLM.from_base(base, base_kwargs=base_kwargs, memory_size=memory_size, **settings)
    return model.eval(), load_base_tokenizer(base, base_kwargs)


def shipped_model_with_index(memory_size: int, memory_dtype=None, memory_value_dtype=None):
    """The shipped SmolLM2 wrapped with PASSKEY_MEMORY, the index on (`memory_search="auto"`), and its tokenizer: what
    the scripts that look inside a long read (`scripts/generation_read_parts.py`, `scripts/memory_read_rss.py`) time."""
    settings = argparse.Namespace(
        quick=False,
        model=None,
        search="auto",
        memory_dtype=memory_dtype,
        memory_value_dtype=memory_value_dtype,
    )
    return load_model(settings, memory_size)


def book_tokens(tokenizer, count: int, text_path: str) -> torch.Tensor:
    """`count` tokens of the held-out book (repeated where shorter), as one row."""
    text = open(text_path, encoding="utf-8").read()
    if tokenizer is None:
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    else:
        ids = torch.tensor(tokenizer(text[:2_000_000], add_special_tokens=False).input_ids, dtype=torch.long)
    return ids.repeat(count // ids.numel() + 1)[:count].unsqueeze(0)


def read_long(model, tokens: torch.Tensor, chunk: int) -> dict:
    """Stream `tokens` into memory `chunk` tokens per `memorize` call; time each call."""
    state, seconds, rss = None, [], []
    with torch.no_grad():
        for start in range(0, tokens.shape[1], chunk):
            began = time.perf_counter()
            state = model.memorize(tokens[:, start : start + chunk], memory_state=state)
            seconds.append(time.perf_counter() - began)
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    total = sum(seconds)
    return {
        "state": state,
        "tokens": tokens.shape[1],
        "seconds": total,
        "tokens_per_s": tokens.shape[1] / total,
        "chunk_seconds": seconds,
        "chunk_peak_rss_bytes": rss,  # the process's peak RSS after each chunk: how it grows with the memory
        # flat cost: time per chunk of the last quarter of the read over that of its first quarter, the first chunk
        # left out (it pays one-off costs); 1.0 is flat
        "cost_ratio_last_vs_first_quarter": flat_cost(seconds),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def flat_cost(chunk_seconds: list[float]) -> float | None:
    """Median time of the last quarter of the chunks over that of the first quarter (after the first chunk, which
    pays one-off costs): how much more a chunk costs at the end of a long read than near its start (1.0: flat).
    None with fewer than 3 chunks."""
    if len(chunk_seconds) < 3:
        return None
    timed = chunk_seconds[1:]
    quarter = max(1, len(timed) // 4)
    return median(timed[-quarter:]) / median(timed[:quarter])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, small reads (smoke test)")
    parser.add_argument("--model", default=None, help="a saved memory model folder (default: the shipped SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=None, help="the long read (default 1,048,576; quick 4,096)")
    parser.add_argument(
        "--chunk", type=int, default=None, help="tokens per memorize call (default 65,536; quick 1,024)"
    )
    parser.add_argument(
        "--long-dtype", default="bfloat16", choices=["float32", "bfloat16"], help="dtype of figures 2-4"
    )
    parser.add_argument(
        "--memory-dtype",
        default=None,
        choices=list(MEMORY_DTYPES),
        help="storage dtype of the entries (default: the model's): bfloat16 entries with a float32 model is the way "
        "to read in float32 where bfloat16 arithmetic is slow (CPUs without AVX-512) at bfloat16's memory",
    )
    parser.add_argument(
        "--memory-value-dtype",
        default=None,
        choices=list(MEMORY_DTYPES),
        help="storage dtype of the values alone (default: --memory-dtype's): float8 keys with bfloat16 values",
    )
    parser.add_argument(
        "--reading-dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="figure 1's dtypes, beside --long-dtype (float32 alone where bfloat16 arithmetic is slow: AVX2 CPUs)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per model (default 5; quick 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (at least 2)")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        nargs="+",
        default=None,
        help="prompt lengths, one generation figure each (default 64: a question; longer ones fill the window)",
    )
    parser.add_argument(
        "--search", default="exact", choices=["exact", "auto"], help="memory_search: the config's exact read, or auto"
    )
    parser.add_argument(
        "--probes",
        type=int,
        nargs="+",
        default=None,
        help="with --search auto: index lists searched per query, one generation figure each (default 32)",
    )
    parser.add_argument("--text", default="data/books/held_out/moby_dick.txt", help="the book read into memory")
    parser.add_argument(
        "--list-codes",
        default=None,
        choices=["QT_8bit", "QT_6bit", "QT_4bit"],
        help="with --search auto: the index lists' scalar quantizer instead of the library's (8-bit)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is instead of keeping freed memory for reuse (hf_memlm.training.keep_freed_memory)",
    )
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/real_model[_quick].json)")
    args = parser.parse_args(argv)
    kept_freed_memory = False if args.default_malloc else keep_freed_memory()
    if args.list_codes:
        memory_kv_index._LIST_CODES = args.list_codes
    torch.set_num_threads(args.threads)
    long_tokens = args.tokens if args.tokens is not None else (4096 if args.quick else 1 << 20)
    chunk = args.chunk if args.chunk is not None else (1024 if args.quick else 1 << 16)
    repeats = args.repeats or (2 if args.quick else 5)
    if long_tokens <= 0 or chunk <= 0:
        raise ValueError(f"--tokens and --chunk must be positive, got {long_tokens} and {chunk}.")
    if args.new_tokens < 2 or any(length <= 0 for length in args.prompt_tokens or []):
        raise ValueError(
            f"--new-tokens must be at least 2 (a new token's time is that of the tokens after the first) and "
            f"--prompt-tokens positive, got {args.new_tokens} and {args.prompt_tokens}."
        )

    model, tokenizer = load_model(args, memory_size=long_tokens + 4096)
    fast = model.to(getattr(torch, args.long_dtype))
    tokens = book_tokens(tokenizer, long_tokens + 1024, args.text)
    document = tokens[:, :long_tokens]

    def prompt_of(length: int) -> torch.Tensor:
        return tokens[:, long_tokens : long_tokens + length]

    # the first prompt and the new tokens fit one segment (the quick model's segments are short)
    prompt_lengths = args.prompt_tokens or [min(64, model.config.segment_length // 2)]

    # 2. the long read first: the process's peak RSS is then that of reading it
    long = read_long(fast, document, chunk)
    state = long.pop("state")
    layer = fast.config.memory_layers[0]
    reads_use_index = bool(fast.memory_blocks[str(layer)].uses_index(state.layers[layer]))

    # 3. generation with the long read in memory vs the base from its window
    block = fast.memory_blocks[str(layer)]
    generation_by_probes = {}
    for probes in args.probes or [block.search_probes]:
        block.search_probes = probes  # the next reads search this many lists per query (the index is kept)
        generation_by_probes[probes] = generation_figure(fast, state, prompt_of(prompt_lengths[0]), args, repeats)
    generation = next(iter(generation_by_probes.values()))
    block.search_probes = next(iter(generation_by_probes))
    generation_by_prompt = {prompt_lengths[0]: generation}
    for length in prompt_lengths[1:]:
        generation_by_prompt[length] = generation_figure(fast, state, prompt_of(length), args, repeats)
    state = None  # frees the long read's entries before the next figures

    # 4. a forward and a training step on 4 segments, memory vs the base per segment
    segment = fast.config.segment_length
    pieces = tokens[:, : 4 * segment]
    segments = pieces.split(segment, dim=1)

    def infer_memory():
        with torch.no_grad():
            fast(input_ids=pieces)

    def infer_base():
        with torch.no_grad():
            for piece in segments:
                fast.language_model(input_ids=piece)

    def train_memory():
        fast(input_ids=pieces, labels=pieces).loss.backward()

    def train_base():
        for piece in segments:
            fast.language_model(input_ids=piece, labels=piece).loss.backward()

    def train_base_one_backward():
        sum(fast.language_model(input_ids=piece, labels=piece).loss for piece in segments).backward()

    wall, _ = interleaved({"base": infer_base, "memory": infer_memory}, repeats)
    inference_ratio = median(wall["base"]) / median(wall["memory"])
    wall, _ = interleaved(
        {"base": train_base, "memory": train_memory, "base_one_backward": train_base_one_backward}, repeats
    )
    training_ratio = median(wall["base"]) / median(wall["memory"])
    one_backward_ratio = median(wall["base"]) / median(wall["base_one_backward"])
    fast.zero_grad(set_to_none=True)

    # 1. reading by dtype, side by side on one chunk
    by_dtype = {args.long_dtype: fast}
    for other in args.reading_dtypes:
        if other != args.long_dtype:
            by_dtype[other] = model_copy(fast, getattr(torch, other))
    chunk_ids = document[:, :chunk]
    runs = {name: functools.partial(each.memorize, chunk_ids) for name, each in by_dtype.items()}
    wall, _ = interleaved(runs, repeats)
    reading = {name: chunk_ids.shape[1] / median(times) for name, times in wall.items()}

    figures = {
        "memorize_tokens_per_s_by_dtype": reading,
        "long_read": long,
        "generation": generation,
        "generation_by_probes": generation_by_probes if reads_use_index else None,
        "generation_by_prompt_tokens": generation_by_prompt,
        "inference_ratio_vs_segmented_base": inference_ratio,
        "training_step_ratio_vs_segmented_base": training_ratio,
        "base_one_backward_ratio_vs_segmented_base": one_backward_ratio,
    }
    setting = {
        "model": args.model
        or ("tiny llama" if args.quick else "smollm2-135m-instruct (shipped GGUF, float32 weights)"),
        "memory": {
            k: v
            for k, v in fast.config.to_dict().items()
            if k in {*PASSKEY_MEMORY, "memory_dtype", "memory_value_dtype"}
        },
        "reads_use_index": reads_use_index,
        "list_codes": memory_kv_index._LIST_CODES if reads_use_index else None,
        "long_dtype": args.long_dtype,
        "long_tokens": long_tokens,
        "chunk_tokens": chunk,
        "repeats": repeats,
        "new_tokens": args.new_tokens,
        "prompt_tokens": prompt_lengths,
        "text": args.text,
        "keeps_freed_memory": kept_freed_memory,
    }
    rows = [[f"`memorize` tokens/s, {name}", f"{value:,.0f}"] for name, value in sorted(reading.items(), reverse=True)]
    rows += [
        [f"`memorize` tokens/s over {long_tokens:,} tokens ({args.long_dtype})", f"{long['tokens_per_s']:,.0f}"],
        ["time per chunk, last quarter of the read / first quarter", _ratio(long["cost_ratio_last_vs_first_quarter"])],
        ["peak RSS up to the end of the read", f"{long['peak_rss_bytes'] / 2**30:.2f} GiB"],
        *(
            [
                [
                    f"generation with the read in memory / base from its window, {probes} lists, new tokens "
                    f"(prompt and new tokens)",
                    f"{g['new_token_ratio_vs_base']:.3f} ({g['ratio_vs_base']:.3f})",
                ]
                for probes, g in generation_by_probes.items()
            ]
            if reads_use_index
            else [
                [
                    "generation with the read in memory / base from its window, new tokens (prompt and new tokens)",
                    f"{generation['new_token_ratio_vs_base']:.3f} ({generation['ratio_vs_base']:.3f})",
                ]
            ]
        ),
        *(
            [
                f"generation after a {length}-token prompt, new tokens (prompt and new tokens); prompt alone, "
                "memory / base time",
                f"{g['new_token_ratio_vs_base']:.3f} ({g['ratio_vs_base']:.3f}); {g['prompt_time_ratio']:.2f}",
            ]
            for length, g in generation_by_prompt.items()
        ),
        ["forward tokens/s, memory / segmented base", f"{inference_ratio:.3f}"],
        ["training step tokens/s, memory / segmented base", f"{training_ratio:.3f}"],
        [
            "training step tokens/s, base with one backward through the segments / segmented base",
            f"{one_backward_ratio:.3f}",
        ],
    ]
    table = markdown_table(["figure", "value"], rows)
    payload = {"setting": setting, "environment": environment(), "figures": figures}
    return report("real_model", payload, table, args)


def new_token_seconds(whole: list[float], first: list[float], new_tokens: int) -> float:
    """A new token's time, the prompt's pass left out: (median whole call - median call making one token) over the
    tokens after the first."""
    return (median(whole) - median(first)) / (new_tokens - 1)


def generation_figure(model, state, prompt: torch.Tensor, args, repeats: int) -> dict:
    """Greedy generation of `args.new_tokens` after `prompt`, the memory model with `state` against the base from its
    window, side by side. New tokens/s leaves the prompt out: each is also timed making one token (the prompt's pass),
    and a new token costs (whole call - that) / (new tokens - 1)."""
    options = dict(do_sample=False, pad_token_id=0)
    many = dict(options, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    one = dict(options, max_new_tokens=1, min_new_tokens=1)

    def run(generate, **kwargs):
        def call():
            with torch.no_grad():
                generate(prompt, **kwargs)

        return call

    wall, _ = interleaved(
        {
            "base": run(model.language_model.generate, **many),
            "memory": run(model.generate, memory_state=state, **many),
            "base_prompt": run(model.language_model.generate, **one),
            "memory_prompt": run(model.generate, memory_state=state, **one),
        },
        repeats,
    )
    per_new_token = {
        name: new_token_seconds(wall[name], wall[f"{name}_prompt"], args.new_tokens) for name in ("base", "memory")
    }
    return {
        "prompt_tokens": prompt.shape[1],
        "new_tokens_per_s": {name: 1 / seconds for name, seconds in per_new_token.items()},
        "new_token_ratio_vs_base": per_new_token["base"] / per_new_token["memory"],
        "ratio_vs_base": median(wall["base"]) / median(wall["memory"]),  # the whole call, prompt included
        "prompt_time_ratio": median(wall["memory_prompt"]) / median(wall["base_prompt"]),
        "wall_s": wall,
    }


def _ratio(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def model_copy(model, dtype):
    """An independent copy of `model` in `dtype` (the original is left as it is)."""
    import copy

    return copy.deepcopy(model).to(dtype)


if __name__ == "__main__":
    main()
