"""Peers side by side: our `kv` memory LM, Memorizing Transformers and the Recurrent Memory Transformer on
the main job's passkey task, at the same parameter budget (within 20%) and the same CPU time for training.

All three models see the same examples: the main job's training stream (`configs/passkey_cpu.yaml`: byte
tokens, 4 segments of 64, `make_passkey_dataset` with its seed and options), consumed in generation order in
batches of 32 until each model has used its CPU-time budget, and the main job's evaluation (100 examples
per distance, the key 1, 4, 8, 12 and 16 segments before the question, natural filler). Each model is scored
the same way (`passkey_predictions`: teacher-forced argmax of the key digits given the true prefix); for our
model the script checks that this agrees with `hf_memlm.evaluation.evaluate_retrieval`.

    python benchmarks/bench_peers.py            # the comparison (about 20 min of CPU time)
    python benchmarks/bench_peers.py --quick    # tiny budgets, well under a minute (CI smoke)

The peers are not dependencies of hf_memlm. Install them in the benchmark environment only:

    pip install --no-deps --target benchmarks/.peers-env -r benchmarks/peers_requirements.txt

Without them the script runs our model alone and says which peer it skipped and why.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from common import cpu_seconds, environment, interleaved, markdown_table, median, report
from peers import (
    DEFAULT_PEERS_ENV,
    MEMORIZING_SETTINGS,
    PEER_PACKAGES,
    RMT_SETTINGS,
    MemorizingPeer,
    RecurrentMemoryPeer,
    load_peers,
)

import hf_memlm

ROOT = Path(__file__).resolve().parent.parent
MAIN_JOB_CONFIG = ROOT / "configs" / "passkey_cpu.yaml"
MODELS = ("ours", "memorizing", "rmt")


# -- the task --------------------------------------------------------------------------------------------
def main_job_config(output_dir: str, num_examples: int) -> dict:
    """The main job's config with `num_examples` training examples (the first 9,600 are the main job's)."""
    from hf_memlm.recipes.config import load_train_config

    return load_train_config(
        MAIN_JOB_CONFIG,
        [
            "--output_dir",
            output_dir,
            "--data.num_examples",
            str(num_examples),
            # the examples in the order they were generated, so the peers' loops see the same batches
            "--training.train_sampling_strategy",
            "sequential",
            "--training.report_to",
            "none",
            "--training.disable_tqdm",
            "true",
        ],
    )


def evaluation_dataset(config: dict, tokenizer, num_examples: int, num_segments: list[int]):
    """The main job's evaluation examples (its seed and options), `num_examples` per length."""
    from hf_memlm.evaluation import retrieval_dataset

    evaluation = config["evaluation"]
    return retrieval_dataset(
        "passkey",
        tokenizer,
        num_examples,
        config["model"]["memory"]["segment_length"],
        num_segments,
        evaluation["seed"],
        evaluation.get("options"),
    )


# -- scoring -----------------------------------------------------------------------------------------------
def passkey_predictions(logits_fn, dataset, batch_size: int) -> list[dict]:
    """Per example: the argmax prediction of each key token given the true tokens before it.

    `logits_fn(input_ids)` returns next-token logits for every position of a (batch, length) tensor, reading
    the whole example as the model does (segments, memory). Returns dicts with `predicted`, `target` (token
    ids of the key), `exact` and `distance_segments`.
    """
    rows = []
    for indices in same_length_batches(dataset, batch_size):
        batch = dataset[indices]
        input_ids = torch.tensor(batch["input_ids"], dtype=torch.long)
        with torch.no_grad():
            predicted = logits_fn(input_ids).argmax(-1)  # position p predicts token p + 1
        for row in range(input_ids.shape[0]):
            first, length = int(batch["answer_start"][row]), int(batch["answer_length"][row])
            guess = predicted[row, first - 1 : first - 1 + length].tolist()
            target = input_ids[row, first : first + length].tolist()
            rows.append(
                {
                    "predicted": guess,
                    "target": target,
                    "exact": guess == target,
                    "distance_segments": int(batch["distance_segments"][row]),
                }
            )
    return rows


def same_length_batches(dataset, batch_size: int) -> list[list[int]]:
    """Consecutive example indices in batches of at most `batch_size`, each of one length (no padding)."""
    batches, lengths = [], [len(ids) for ids in dataset["input_ids"]]
    for index, length in enumerate(lengths):
        if batches and len(batches[-1]) < batch_size and lengths[batches[-1][0]] == length:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def exact_match_by_distance(rows: list[dict]) -> dict[int, float]:
    by_distance: dict[int, list[bool]] = {}
    for row in rows:
        by_distance.setdefault(row["distance_segments"], []).append(row["exact"])
    return {distance: sum(hits) / len(hits) for distance, hits in sorted(by_distance.items())}


def key_token_accuracy_by_distance(rows: list[dict]) -> dict[int, float]:
    """Fraction of key tokens (digits) predicted right: 0.1 is a guess, 1.0 every digit."""
    right: dict[int, list[int]] = {}
    for row in rows:
        counts = right.setdefault(row["distance_segments"], [0, 0])
        counts[0] += sum(p == t for p, t in zip(row["predicted"], row["target"]))
        counts[1] += len(row["target"])
    return {distance: hits / total for distance, (hits, total) in sorted(right.items())}


def previous_segment_examples(config: dict, tokenizer, num_train: int, num_eval: int):
    """(train, eval): the main task with the key always in the segment before the question's. Both peers keep
    that segment in their Transformer-XL cache, so it needs no long-term memory; a peer that learns this but
    not the main task fails at carrying the key further."""
    from hf_memlm.data import make_passkey_dataset

    segments = config["data"]["num_segments"]
    segment_length = config["model"]["memory"]["segment_length"]
    options = {**config["data"]["options"], "needle_segment": segments - 2}
    train = make_passkey_dataset(
        tokenizer, num_train, segment_length, segments, seed=config["seed"], **options
    ).select_columns(["input_ids", "labels"])
    options = {**config["evaluation"]["options"], "needle_segment": segments - 2}
    evaluation = make_passkey_dataset(
        tokenizer, num_eval, segment_length, segments, seed=config["evaluation"]["seed"], **options
    )
    return train, evaluation


def agreement_with_evaluation(model, dataset, rows: list[dict], batch_size: int) -> dict:
    """Compare `passkey_predictions` of our model with `hf_memlm.evaluation.evaluate_retrieval` per answer."""
    from hf_memlm.evaluation import evaluate_retrieval

    results = evaluate_retrieval(model, dataset, batch_size=batch_size, baselines=False, task="passkey", progress=False)
    theirs = [(answer["predicted"]["memory"], answer["exact"]["memory"]) for answer in results["answers"]]
    ours = [(row["predicted"], row["exact"]) for row in rows]
    differing = sum(a != b for a, b in zip(theirs, ours)) + abs(len(theirs) - len(ours))
    return {"answers": len(theirs), "differing": differing, "agrees": differing == 0}


# -- the models --------------------------------------------------------------------------------------------
def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def reply_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the labelled tokens (the reply), as our model computes it."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


# -- training ----------------------------------------------------------------------------------------------
def train_ours(config: dict, budget_cpu_s: float, max_steps: int, threads: int):
    """The main-job recipe through the public API (`prepare_run`, `MemLMTrainer`), stopped by a CPU-time
    budget instead of a step count. Returns (prepared run, model, training record)."""
    from transformers import TrainerCallback, default_data_collator

    from hf_memlm.recipes.train import prepare_run
    from hf_memlm.training import MemLMTrainer

    config["training"]["max_steps"] = max_steps
    prepared = prepare_run(config)
    record = {"steps": 0, "losses": []}

    class CpuBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            torch.set_num_threads(threads)  # the Trainer may have changed it
            record["start_cpu"], record["start_wall"] = cpu_seconds(), time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["steps"] = state.global_step
            if cpu_seconds() - record["start_cpu"] >= budget_cpu_s:
                control.should_training_stop = True

    trainer = MemLMTrainer(
        model=prepared.model,
        args=prepared.training_args,
        train_dataset=prepared.train_dataset,
        data_collator=default_data_collator,
        callbacks=[CpuBudget()],
    )
    trainer.train()
    record["cpu_s"] = cpu_seconds() - record.pop("start_cpu")
    record["wall_s"] = time.perf_counter() - record.pop("start_wall")
    record["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    record["final_train_loss"] = trainer.state.log_history[-1].get("train_loss")
    return prepared, prepared.model.eval(), record


def optimizer_for(peer, training: dict):
    """AdamW with the main job's settings; the peer's memory parameters get the memory learning rate."""
    from transformers import get_constant_schedule_with_warmup

    memory_ids = {id(p) for p in peer.memory_parameters()}
    groups = [
        {"params": [p for p in peer.model.parameters() if id(p) not in memory_ids], "lr": training["learning_rate"]},
        {"params": [p for p in peer.model.parameters() if id(p) in memory_ids], "lr": training["memory_learning_rate"]},
    ]
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]],
        betas=(0.9, training["adam_beta2"]),
        eps=1e-8,
        weight_decay=training["weight_decay"],
    )
    return optimizer, get_constant_schedule_with_warmup(optimizer, training["warmup_steps"])


def train_peer(peer, train_dataset, training: dict, budget_cpu_s: float, max_steps: int) -> dict:
    """The same batches in the same order as our Trainer, until the CPU budget is used."""
    optimizer, schedule = optimizer_for(peer, training)
    batch_size = training["per_device_train_batch_size"]
    peer.model.train()
    losses, step = [], 0
    start_cpu, start_wall = cpu_seconds(), time.perf_counter()
    while step < max_steps and cpu_seconds() - start_cpu < budget_cpu_s:
        batch = train_dataset[step * batch_size : (step + 1) * batch_size]
        input_ids = torch.tensor(batch["input_ids"], dtype=torch.long)
        labels = torch.tensor(batch["labels"], dtype=torch.long)
        loss = reply_loss(peer.logits(input_ids), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.model.parameters(), training["max_grad_norm"])
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
    peer.model.eval()
    logged = [sum(losses[i : i + 25]) / len(losses[i : i + 25]) for i in range(0, len(losses), 25)]
    return {
        "steps": step,
        "cpu_s": cpu_seconds() - start_cpu,
        "wall_s": time.perf_counter() - start_wall,
        "losses": [round(value, 4) for value in logged],
        "final_train_loss": sum(losses) / len(losses) if losses else None,
    }


# -- speed -------------------------------------------------------------------------------------------------
def speed(logits_fns: dict, train_batch, eval_input_ids, training: dict, repeats: int) -> dict:
    """Training (forward + backward + AdamW step) and inference tokens/s, interleaved, medians of `repeats`."""
    input_ids, labels = train_batch
    train_runs, infer_runs = {}, {}
    for name, (module, logits_fn) in logits_fns.items():
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-6, betas=(0.9, training["adam_beta2"]))

        def train_step(module=module, logits_fn=logits_fn, optimizer=optimizer):
            module.train()
            reply_loss(logits_fn(input_ids), labels).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            module.eval()

        def infer(logits_fn=logits_fn):
            with torch.no_grad():
                logits_fn(eval_input_ids)

        train_runs[name], infer_runs[name] = train_step, infer
    figures = {}
    for kind, runs, tokens in (
        ("training", train_runs, input_ids.numel()),
        ("inference", infer_runs, eval_input_ids.numel()),
    ):
        wall, cpu = interleaved(runs, repeats)
        for name in runs:
            figures.setdefault(name, {})[kind] = {
                "tokens": tokens,
                "wall_s": [round(s, 4) for s in wall[name]],
                "cpu_s": [round(s, 4) for s in cpu[name]],
                "tokens_per_s_wall": tokens / median(wall[name]),
                "tokens_per_s_cpu": tokens / median(cpu[name]),
            }
    return figures


# -- the run -----------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets, few examples (smoke test, < 1 min)")
    parser.add_argument("--threads", type=int, default=1, help="torch (and faiss) threads, fixed for all models")
    parser.add_argument("--train-cpu-s", type=float, default=None, help="CPU seconds of training per model")
    parser.add_argument("--max-steps", type=int, default=None, help="step cap per model (default 2,400; quick 20)")
    parser.add_argument("--eval-examples", type=int, default=None, help="examples per distance (default 100)")
    parser.add_argument(
        "--check-cpu-s",
        type=float,
        default=None,
        help="CPU seconds per peer of a check with the key always one segment back, in the peers' XL cache "
        "(default 120; quick 1; 0: off)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 5; quick 3)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--peers-env", default=str(DEFAULT_PEERS_ENV), help="folder the peers are installed in")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/peers[_quick].json)")
    args = parser.parse_args(argv)
    wanted = [name for name in args.models.split(",") if name]
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown or "ours" not in wanted:
        parser.error(f"--models {args.models!r}: name ours and any of memorizing, rmt (unknown: {unknown})")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    budget = args.train_cpu_s if args.train_cpu_s is not None else (2.0 if args.quick else 300.0)
    max_steps = args.max_steps or (20 if args.quick else 2400)
    eval_examples = args.eval_examples or (4 if args.quick else 100)
    repeats = args.repeats or (3 if args.quick else 5)
    check_budget = args.check_cpu_s if args.check_cpu_s is not None else (1.0 if args.quick else 120.0)
    torch.set_num_threads(args.threads)

    peer_modules, skipped = load_peers(Path(args.peers_env), wanted)
    for name, message in skipped.items():
        print(f"skipping {name}: {message}")
    if "memorizing" in peer_modules:
        import faiss

        faiss.omp_set_num_threads(args.threads)

    workdir = tempfile.TemporaryDirectory(prefix="bench-peers-")
    config = main_job_config(workdir.name, max_steps * 32)
    training = config["training"]
    if training["per_device_train_batch_size"] != 32:
        raise ValueError(f"{MAIN_JOB_CONFIG} changed its batch size; update main_job_config's example count.")
    num_segments = config["evaluation"]["num_segments"][:2] if args.quick else config["evaluation"]["num_segments"]
    start_environment = environment()
    started = time.perf_counter()

    results = {"models": {}, "skipped": skipped}
    torch.manual_seed(config["seed"])
    prepared, our_model, record = train_ours(config, budget, max_steps, args.threads)
    tokenizer, train_dataset = prepared.tokenizer, prepared.train_dataset
    vocab_size = our_model.config.get_text_config().vocab_size
    eval_dataset = evaluation_dataset(config, tokenizer, eval_examples, num_segments)
    batch_size = config["evaluation"]["batch_size"]

    def ours_logits(input_ids):
        return our_model(input_ids=input_ids).logits

    rows = passkey_predictions(ours_logits, eval_dataset, batch_size)
    memory = our_model.config
    results["models"]["ours"] = {
        "what": f"hf_memlm {hf_memlm.__version__}: MemLMForCausalLM around a Llama (configs/passkey_cpu.yaml)",
        "parameters": parameter_count(our_model),
        "settings": {
            "depth": 2,
            "width": 64,
            "heads": 4,
            "intermediate_size": memory.text_config.intermediate_size,
            "memory_type": memory.memory_type,
            "memory_layers": list(memory.memory_layers),
            "memory_heads": memory.memory_heads,
            "memory_size": memory.memory_size,
            "segment_length": memory.segment_length,
        },
        "training": record,
        "load_average_after_training": environment()["load_average"],
        "exact_match": exact_match_by_distance(rows),
        "key_token_accuracy": key_token_accuracy_by_distance(rows),
        "agreement_with_hf_memlm_evaluation": agreement_with_evaluation(our_model, eval_dataset, rows, batch_size),
    }
    fns = {"ours": (our_model, ours_logits)}

    builders = {"memorizing": MemorizingPeer, "rmt": RecurrentMemoryPeer}
    check_data = None  # built when the first peer needs it
    for name in [n for n in wanted if n in peer_modules]:
        torch.manual_seed(config["seed"])
        peer = builders[name](peer_modules[name], vocab_size)
        record = train_peer(peer, train_dataset, training, budget, max_steps)
        rows = passkey_predictions(peer.logits, eval_dataset, batch_size)
        settings = MEMORIZING_SETTINGS if name == "memorizing" else RMT_SETTINGS
        package = PEER_PACKAGES[name][0]
        results["models"][name] = {
            "what": f"{package} {_version(package)}",
            "parameters": parameter_count(peer.model),
            "settings": dict(settings),
            "training": record,
            "load_average_after_training": environment()["load_average"],
            "exact_match": exact_match_by_distance(rows),
            "key_token_accuracy": key_token_accuracy_by_distance(rows),
        }
        fns[name] = (peer.model, peer.logits)
        if check_budget > 0:
            if check_data is None:
                check_data = previous_segment_examples(config, tokenizer, min(max_steps, 800) * 32, eval_examples)
            torch.manual_seed(config["seed"])
            fresh = builders[name](peer_modules[name], vocab_size)
            record = train_peer(fresh, check_data[0], training, check_budget, max_steps)
            rows = passkey_predictions(fresh.logits, check_data[1], batch_size)
            results["models"][name]["previous_segment_check"] = {
                "task": "trained and evaluated with the key always 1 segment back (in the XL cache), same recipe",
                "training": record,
                "exact_match": exact_match_by_distance(rows),
                "key_token_accuracy": key_token_accuracy_by_distance(rows),
            }

    train_batch = train_dataset[:32] if not args.quick else train_dataset[:4]
    train_batch = (torch.tensor(train_batch["input_ids"]), torch.tensor(train_batch["labels"]))
    longest = same_length_batches(eval_dataset, batch_size)[-1]  # a batch of the longest examples
    eval_input_ids = torch.tensor(eval_dataset[longest]["input_ids"])
    figures = speed(fns, train_batch, eval_input_ids, training, repeats)
    for name, entry in figures.items():
        results["models"][name]["speed"] = entry

    ours_count = parameter_count(our_model)
    for entry in results["models"].values():
        entry["parameters_vs_ours"] = entry["parameters"] / ours_count
    payload = {
        "benchmark": "peers",
        "quick": args.quick,
        "command": "python benchmarks/bench_peers.py" + (" --quick" if args.quick else ""),
        "task": {
            "config": str(MAIN_JOB_CONFIG.relative_to(ROOT)),
            "training_examples": "make_passkey_dataset, 4 segments of 64 bytes, seed 0, the main job's options, "
            "in generation order, batches of 32",
            "evaluation": {"num_segments": num_segments, "examples_per_distance": eval_examples, "seed": 1000},
        },
        "budget": {
            "train_cpu_s": budget,
            "max_steps": max_steps,
            "threads": args.threads,
            "previous_segment_check_cpu_s": check_budget,
        },
        "environment_start": start_environment,
        "environment_end": environment(),
        "total_wall_s": time.perf_counter() - started,
        "total_cpu_s": cpu_seconds(),
        **results,
    }
    return report("peers", payload, results_table(payload), args)


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def results_table(payload: dict) -> str:
    models = payload["models"]
    distances = sorted({d for entry in models.values() for d in entry["exact_match"]})
    header = ["model", "parameters", "steps in budget"]
    header += [f"key {d} seg back" for d in distances]
    header += ["train tok/s (CPU)", "infer tok/s (CPU)", "train tok/s (wall)", "infer tok/s (wall)"]
    rows = []
    for name, entry in models.items():
        speed_entry = entry.get("speed", {})
        row = [name, f"{entry['parameters']:,}", entry["training"]["steps"]]
        row += [f"{entry['exact_match'].get(d, math.nan):.2f}" for d in distances]
        for figure in ("tokens_per_s_cpu", "tokens_per_s_wall"):
            for kind in ("training", "inference"):
                value = speed_entry.get(kind, {}).get(figure)
                row.append(f"{value:,.0f}" if value is not None else "-")
        rows.append(row)
    header2 = ["model"] + [f"digits right, key {d} seg back" for d in distances]
    header2 += ["key 1 seg back only: steps", "exact", "digits right"]
    rows2 = []
    for name, entry in models.items():
        row = [name] + [f"{entry['key_token_accuracy'].get(d, math.nan):.2f}" for d in distances]
        check = entry.get("previous_segment_check")
        if check:
            row += [
                check["training"]["steps"],
                f"{check['exact_match'][1]:.2f}",
                f"{check['key_token_accuracy'][1]:.2f}",
            ]
        else:
            row += ["-", "-", "-"]
        rows2.append(row)
    notes = [f"skipped {name}: {message}" for name, message in payload["skipped"].items()]
    return "\n".join([markdown_table(header, rows), "", markdown_table(header2, rows2), *notes])


if __name__ == "__main__":
    main()
