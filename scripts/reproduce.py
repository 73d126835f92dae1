"""Retrain the README's headline jobs from scratch and compare their figures with the README's, each within a
stated tolerance. Meant to run for long (the toy jobs: about 50 minutes on 2 quiet cores; the real-model jobs on
SmolLM2-135M: about 3 hours more; 12-15 GB of RAM for the 1M passkeys): run it before a stop that changes code
those jobs use, and say which jobs ran.

    PYTHONPATH=$PWD python scripts/reproduce.py                          # every job, into a new temporary folder
    PYTHONPATH=$PWD python scripts/reproduce.py --jobs main slot         # some of them
    PYTHONPATH=$PWD python scripts/reproduce.py --list                   # the jobs, their commands and figures
    PYTHONPATH=$PWD python scripts/reproduce.py --compare-only DIR       # finished runs in DIR/<job>: no training

Each job runs as a user would run it (`python -m hf_memlm train CONFIG --output_dir DIR/<job>`, or the job's
script), with this Python and the checkout's code, into `--workdir` (a new temporary folder unless given). Then
the figures are read from the job's report and compared with the README's: a figure is `ok` when
|measured - expected| <= tolerance. The table is printed and written, with the environment (torch,
transformers, threads, CPU kernels) and each job's wall time, to `reproduce.{md,json}` in the work folder.
Exit status 0 when every figure of every job is within its tolerance, 1 otherwise (a failed job counts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Figure:
    name: str
    expected: float
    tolerance: float
    read: Callable[[Path], float]  # the job's output folder -> the measured value


@dataclass(frozen=True)
class Job:
    name: str
    command: tuple[str, ...]  # "{out}" is the job's output folder
    minutes: int  # wall time on 2 quiet cores, as measured for the README
    figures: tuple[Figure, ...]


def _exact_match(distance: int, condition: str = "memory") -> Callable[[Path], float]:
    def read(out: Path) -> float:
        results = json.loads((out / "eval" / "passkey.json").read_text())
        for bucket in results["by_distance_segments"]:
            if bucket["distance_segments"] == distance:
                return bucket["metrics"][condition]["exact_match"]
        raise KeyError(f"no distance of {distance} segments in {out / 'eval' / 'passkey.json'}")

    return read


def _lm_gain(model: str) -> Callable[[Path], float]:
    def read(out: Path) -> float:
        return json.loads((out / "eval" / "perplexity.json").read_text())["beyond"]["gain_percent"][model]

    return read


def _chat_exact(distance: int, needles: int = 1) -> Callable[[Path], float]:
    def read(out: Path) -> float:
        rows = json.loads((out / "eval" / "chat_passkey.json").read_text())["rows"]
        return next(r["memory"] for r in rows if (r["distance"], r["needles"]) == (distance, needles))

    return read


def _suite_score(length: int, task: str | None = None, suite: str = "ruler") -> Callable[[Path], float]:
    """A task's score (or a suite's average, task None) with memory at `length` tokens, from eval/suite.json."""

    def read(out: Path) -> float:
        results = json.loads((out / "eval" / "suite.json").read_text())
        if task is None:
            return next(r["memory"] for r in results["averages"] if (r["suite"], r["length"]) == (suite, length))
        return next(r["memory"] for r in results["rows"] if (r["task"], r["length"]) == (task, length))

    return read


def _percent_below(model: str, than: str) -> Callable[[Path], float]:
    """How far `model`'s perplexity beyond the reference segment lies below `than`'s, in percent."""

    def read(out: Path) -> float:
        perplexity = json.loads((out / "eval" / "perplexity.json").read_text())["beyond"]["perplexity"]
        return 100.0 * (1.0 - perplexity[model] / perplexity[than])

    return read


def _recall(label: str, pairs: int, distance: int) -> Callable[[Path], float]:
    def read(out: Path) -> float:
        results = json.loads((out / "recall_capacity.json").read_text())
        run = next(r for r in results["runs"] if r["label"] == label)
        return next(p["memory"] for p in run["points"] if (p["pairs"], p["distance"]) == (pairs, distance))

    return read


def _train(config: str, *overrides: str) -> tuple[str, ...]:
    return ("{python}", "-m", "hf_memlm", "train", f"configs/{config}", "--output_dir", "{out}", *overrides)


# The README's figures. Tolerances: a retraining from scratch on another machine draws other rounding (AVX2 and
# AVX-512 kernels learn different weights from the same seed), so a figure may move by the spread the README
# reports for it; a passkey at 1.000 may lose one answer in a hundred. The real-model curve is far from saturated:
# its figures may move by about two binomial standard errors of their example count (±0.10 with 100 examples).
JOBS = {
    job.name: job
    for job in (
        Job(
            "main",
            _train("passkey_cpu.yaml"),
            2,
            (
                Figure("exact match, key 8 segments back", 1.0, 0.05, _exact_match(8)),
                Figure("exact match, key 16 segments back", 1.0, 0.05, _exact_match(16)),
                Figure("memory disabled, 16 segments back", 0.0, 0.01, _exact_match(16, "memory_disabled")),
            ),
        ),
        Job(
            "slot",
            _train("passkey_slot_cpu.yaml"),
            6,
            (
                Figure("exact match, key 8 segments back", 1.0, 0.08, _exact_match(8)),
                Figure("exact match, key 16 segments back", 1.0, 0.08, _exact_match(16)),
            ),
        ),
        Job(
            "lm_books",
            _train("lm_books_cpu.yaml"),
            15,
            (
                Figure("% gain of memory beyond segment 4 (test book)", 4.5, 1.0, _lm_gain("memory")),
                Figure("% gain of window 128 beyond segment 4 (test book)", -0.2, 1.5, _lm_gain("double_window")),
            ),
        ),
        Job(
            "passkey_1m",
            _train("passkey_1m_cpu.yaml"),
            18,
            (
                Figure("exact match, key 16k tokens back", 1.0, 0.01, _exact_match(256)),
                Figure("exact match, key 256k tokens back", 1.0, 0.01, _exact_match(4096)),
                Figure("exact match, key 1M tokens back", 1.0, 0.01, _exact_match(16384)),
            ),
        ),
        Job(
            "recall_capacity",
            ("{python}", "scripts/recall_capacity.py", "--output-dir", "{out}", "--threads", "{threads}"),
            11,
            (
                Figure("kv, 84 pairs, 16 segments later", 0.99, 0.03, _recall("kv", 84, 16)),
                Figure("slot 64, 84 pairs, 16 segments later", 0.99, 0.03, _recall("slot, 64 slots", 84, 16)),
                Figure("slot 16, 84 pairs, 16 segments later", 0.47, 0.10, _recall("slot, 16 slots", 84, 16)),
            ),
        ),
        Job(
            "smollm2_passkey",
            _train("smollm2_passkey_cpu.yaml"),
            60,  # AVX2, float32, the whole config: 58 min (training 17 min, its evaluation 41 min)
            (
                Figure("exact match in chat, key 16k tokens back", 1.00, 0.03, _chat_exact(16384)),
                Figure("exact match in chat, key 64k tokens back", 1.00, 0.03, _chat_exact(65536)),
                Figure("exact match in chat, key 256k tokens back", 1.00, 0.06, _chat_exact(262144)),
                Figure("exact match in chat, key 1M tokens back", 1.00, 0.10, _chat_exact(1048576)),
                Figure("exact match in chat, 64k back among 4 needles", 0.97, 0.05, _chat_exact(65536, 4)),
            ),
        ),
        Job(
            "smollm2_suite",
            _train("smollm2_suite_cpu.yaml"),
            45,  # AVX2, float32: training 28 min, the suite at 16k 17 min
            (
                Figure("RULER average with memory at 16k (20 examples per task)", 50.2, 10.0, _suite_score(16384)),
                Figure("single needle in book text at 16k", 90.0, 15.0, _suite_score(16384, "niah_single_book")),
                Figure("single needle in noise at 16k", 95.0, 15.0, _suite_score(16384, "niah_single_noise")),
            ),
        ),
        Job(
            "smollm2_lm_books",
            _train("smollm2_lm_books_cpu.yaml", "--comparison.repeats", "1"),  # the README's one seed
            65,
            (
                Figure("% below the base as shipped beyond segment 4", 8.4, 1.5, _percent_below("memory", "base")),
                Figure("% below no_memory (LoRA) beyond segment 4", -10.0, 1.5, _percent_below("memory", "no_memory")),
            ),
        ),
    )
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", metavar="JOB", help=f"jobs to run (default all): {', '.join(JOBS)}")
    parser.add_argument("--workdir", help="folder for the jobs' outputs (default: a new temporary folder)")
    parser.add_argument("--compare-only", metavar="DIR", help="compare finished runs in DIR/<job>; train nothing")
    parser.add_argument("--threads", type=int, help="torch threads of each job (OMP_NUM_THREADS; default: torch's)")
    parser.add_argument("--list", action="store_true", help="print the jobs, their commands and figures, and exit")
    args = parser.parse_args(argv)
    unknown = [job for job in args.jobs or [] if job not in JOBS]
    if unknown:
        parser.error(f"unknown job(s) {', '.join(unknown)}; choose among {', '.join(JOBS)}.")
    if args.compare_only and args.workdir:
        parser.error("--compare-only DIR reads finished runs in DIR; --workdir is where new runs go: give one.")
    if args.compare_only and not Path(args.compare_only).is_dir():
        parser.error(f"--compare-only {args.compare_only}: no such folder (it should hold one folder per job).")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}.")
    args.jobs = args.jobs or list(JOBS)
    return args


def run_job(job: Job, out: Path, threads: int | None) -> tuple[int, float]:
    """Run a job's command into `out` (its log beside it, `<out>.log`); return (exit status, seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [
        part.format(python=sys.executable, out=out, threads=threads or env.get("OMP_NUM_THREADS", "1"))
        for part in job.command
    ]
    start = time.perf_counter()
    with open(f"{out}.log", "w", encoding="utf-8") as log:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return status.returncode, time.perf_counter() - start


def compare(job: Job, out: Path) -> list[dict]:
    """One row per figure: expected, tolerance, measured (None when it cannot be read) and verdict."""
    rows = []
    for figure in job.figures:
        row = {"job": job.name, "figure": figure.name, "expected": figure.expected, "tolerance": figure.tolerance}
        try:
            measured = float(figure.read(out))
        except (OSError, KeyError, StopIteration, ValueError, TypeError) as error:
            row.update(measured=None, verdict="missing", error=f"{type(error).__name__}: {error}")
        else:
            inside = abs(measured - figure.expected) <= figure.tolerance + 1e-9
            row.update(measured=measured, verdict="ok" if inside else "OUTSIDE")
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| job | figure | expected | tolerance | measured | verdict |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        measured = "–" if row["measured"] is None else f"{row['measured']:.3f}"
        lines.append(
            f"| {row['job']} | {row['figure']} | {row['expected']:.3f} | ±{row['tolerance']:.3f} | {measured} | "
            f"{row['verdict']} |"
        )
    return "\n".join(lines)


def environment() -> dict:
    from hf_memlm.evaluation import environment as measured_environment

    return measured_environment()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for job in (JOBS[name] for name in args.jobs):
            print(f"{job.name} (about {job.minutes} min): {' '.join(job.command)}")
            for figure in job.figures:
                print(f"  {figure.name}: {figure.expected} ± {figure.tolerance}")
        return 0
    base = Path(args.compare_only or args.workdir or tempfile.mkdtemp(prefix="hf_memlm_reproduce_"))
    base.mkdir(parents=True, exist_ok=True)
    rows, timings = [], {}
    for name in args.jobs:
        job, out = JOBS[name], base / name
        if not args.compare_only:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: running (about {job.minutes} min), log {out}.log", flush=True)
            status, seconds = run_job(job, out, args.threads)
            timings[name] = {"exit_status": status, "seconds": round(seconds, 1)}
            if status != 0:
                print(f"  {name} failed (exit status {status}); see {out}.log", flush=True)
        rows.extend(compare(job, out))
    env = environment()
    text = table(rows)
    print(text)
    failed = [name for name, timing in timings.items() if timing["exit_status"] != 0]
    good = all(row["verdict"] == "ok" for row in rows) and not failed
    verdict = "every figure within its tolerance" if good else "some figures differ, are missing, or a job failed"
    print(f"{verdict} ({', '.join(args.jobs)}); outputs in {base}")
    report = {"jobs": args.jobs, "rows": rows, "timings": timings, "environment": env, "all_ok": good}
    (base / "reproduce.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    from hf_memlm.evaluation import environment_line

    (base / "reproduce.md").write_text(
        f"{text}\n\n{verdict}; jobs: {', '.join(args.jobs)}.\n\n{environment_line(env)}\n", encoding="utf-8"
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
