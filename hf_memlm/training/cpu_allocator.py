"""Freed memory kept for reuse on Linux (glibc): what a training step through several segments needs to run at the
base model's speed on a CPU.

glibc's `malloc` serves each large block (32 MB at most decides "large": `M_MMAP_THRESHOLD`) with its own `mmap`
and unmaps it when it is freed, and hands the heap's free top back to the system past `M_TRIM_THRESHOLD`. The next
call then page-faults all of it in again, zero-filled. A memory model's training step back-propagates through every
segment of a call at once (later segments' reads reach earlier segments' writes), so it holds and then frees
several segments' activations together, where the base model trained segment by segment reuses one segment's.
On SmolLM2-135M in float32 on 2 cores, the base model alone with one backward through 4 segments of 256 tokens ran
at 0.74-0.77x the speed of four per-segment backwards, and at 0.98-1.00x with freed memory kept; a memory model's
step went from 0.67x to 0.95x the base's (benchmarks/README.md, "Training steps and generation at the base's pace").

`keep_freed_memory()` turns both off for the process (`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, max)`),
as the caching allocators PyTorch recommends for CPUs (jemalloc, tcmalloc) do: large blocks come from the heap and
freed ones are reused. The process's peak memory is unchanged; between steps it stays near its peak instead of
shrinking. `hf-memlm` commands and `MemLMTrainer` call it; set `HF_MEMLM_KEEP_FREED_MEMORY=0` to leave `malloc` as
it is. Elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "HF_MEMLM_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: the largest trim threshold it accepts

_lock = threading.Lock()
_applied: bool | None = None


def _glibc():
    """The C library when it is glibc (it has `mallopt` with these parameters), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # only glibc defines it


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (module doc); once per process. Returns whether `malloc` now
    keeps it: False where the C library is not glibc, or `HF_MEMLM_KEEP_FREED_MEMORY=0` says to leave it."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    libc = _glibc()
    if libc is None:
        return False
    kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    if kept:
        logger.info(
            "malloc keeps freed memory for reuse (training through several segments runs at the base's speed); "
            "%s=0 leaves it as it was.",
            ENVIRONMENT_VARIABLE,
        )
    return kept


__all__ = ["ENVIRONMENT_VARIABLE", "keep_freed_memory"]
