"""Forward tokens per second of the shipped SmolLM2-135M in float32 and bfloat16, side by side on this machine:
whether bfloat16 is computed natively here (`dtype: auto` picks it only on a GPU or an AVX-512 CPU).

    PYTHONPATH=$PWD python scripts/dtype_speed.py --threads 2 --repeats 5

Prints the median tokens/s per dtype over `--repeats` alternating rounds (3 forwards of 256 tokens each) and
torch's CPU capability.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from hf_memlm.evaluation.report import reading_dtype
from hf_memlm.integrations.gguf import resolve_base


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder, kwargs = resolve_base("smollm2-135m-instruct", {"dtype": torch.float32})
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    ids = torch.randint(100, 40000, (1, 256), generator=torch.Generator().manual_seed(0))
    rates = {torch.float32: [], torch.bfloat16: []}
    with torch.no_grad():
        for _ in range(args.repeats):
            for dtype, measured in rates.items():
                model.to(dtype)
                model(ids)  # warm-up in this dtype
                started = time.perf_counter()
                for _ in range(3):
                    model(ids)
                measured.append(3 * ids.shape[1] / (time.perf_counter() - started))
    medians = {str(dtype).removeprefix("torch."): statistics.median(values) for dtype, values in rates.items()}
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    for name, rate in medians.items():
        print(f"  {name}: {rate:,.0f} tokens/s (median of {args.repeats})")
    print(f"  bfloat16 / float32: {medians['bfloat16'] / medians['float32']:.2f}; auto picks {reading_dtype('auto')}")


if __name__ == "__main__":
    main()
