"""Timing and memory helpers: summaries of raw samples, per-token latency percentiles, peak memory.

Every figure in a report is a summary of raw samples that stay in the JSON: median (the headline), min, max,
the interquartile range and p95, with the sample count.
"""
from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np


T = TypeVar("T")


def rotated_rounds(settings: Sequence[T], rounds: int, run: Callable[[T, int], dict],
                   say: Callable[[int, T, dict], Any]) -> list[dict]:
    """Measure every setting once per round, the order rotated by one from round to round, so neither a drifting
    background load nor the caches a run leaves behind favour one setting. run(setting, round) -> sample; each
    sample gets its "round" and is handed to say(round, setting, sample) (progress lines)."""
    samples = []
    for r in range(rounds):
        k = r % len(settings)
        for setting in [*settings[k:], *settings[:k]]:
            sample = {**run(setting, r), "round": r}
            samples.append(sample)
            say(r, setting, sample)
    return samples


def now() -> float:
    return time.perf_counter()


def ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def summarize(samples: Sequence[float]) -> dict[str, float | int] | None:
    """{n, median, min, max, iqr, p95, mean} of the samples; None when there are none."""
    values = np.asarray([float(s) for s in samples], dtype=np.float64)
    if values.size == 0:
        return None
    q1, med, q3, p95 = np.percentile(values, [25, 50, 75, 95])
    return {"n": int(values.size), "median": float(med), "min": float(values.min()), "max": float(values.max()),
            "iqr": float(q3 - q1), "p95": float(p95), "mean": float(values.mean())}


def percentile(samples: Iterable[float], q: float) -> float | None:
    values = [float(s) for s in samples]
    return float(np.percentile(values, q)) if values else None


def repeat(fn: Callable[[], dict], runs: int, warmup: int, label: str, progress=None) -> tuple[list[dict], list[dict]]:
    """Call fn() warmup + runs times; -> (warm-up results, timed results). Each result is fn's dict of samples."""
    warm, timed = [], []
    for i in range(warmup + runs):
        result = fn()
        (warm if i < warmup else timed).append(result)
        if progress is not None:
            progress.set_postfix_str(f"{label} {i + 1}/{warmup + runs}")
            progress.update(1)
    return warm, timed


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB); Linux reports ru_maxrss in KiB, macOS in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize() / 2**20


def gpu_memory_mib() -> dict[str, float] | None:
    """GPU memory this process holds: torch's peak allocation and what nvidia-smi attributes to our pid."""
    out: dict[str, float] = {}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    import os

    from runtimes.device_facts import nvidia_smi_process_mib

    used = nvidia_smi_process_mib(os.getpid())
    if used is not None:
        out["nvidia_smi_used_mib"] = used
    return out or None
