"""Was the machine shared while a job ran? Measured around each job, from the kernel's own accounting.

    probe = Probe.start()                    # /proc/stat ticks, this process's and its children's CPU time, the clock
    ...run the job (in a child process, or in this one)...
    record = probe.finish(threads=2)         # {"own_cpu_share", "others_share", "steal_share", ..., "contended"}

Three measurements, each over the job's wall time:
- own CPU share: the CPU seconds the job's process got / (wall seconds x its threads). Evidence, not the verdict: a
  job with serial phases (model loading, Python between kernels) stays below 1 on an idle machine too (the quiet
  bench-1b run of 2026-12-03 gave 79% for the eager baseline, 93% for a llama.cpp combination).
- others' share: CPU time every other process took (busy ticks in /proc/stat minus the job's own CPU time), beyond
  the CPUs the job left free, as a share of the job's CPUs (threads x wall). Over OTHERS_MAX: the job was shared.
- steal: ticks the hypervisor gave to other guests while ours waited, as a share of all ticks. Over STEAL_MAX: shared.
The cgroup's throttled time (a CPU quota, /sys/fs/cgroup/cpu.stat) is recorded and judged like steal.

A contended job is measured again (benchmarks.run: --retries); if it is still contended, every target it feeds is
reported "not measured: machine shared" (benchmarks.analysis). Where /proc/stat cannot be read the verdict is None
(not checked) and the report says so.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes.device_facts import read_proc_stat

OTHERS_MAX = 0.10  # CPU time other processes may take on the job's CPUs (share of threads x wall) for it to count
STEAL_MAX = 0.05  # share of all ticks stolen by the hypervisor
THROTTLED_MAX = 0.05  # share of the wall time the cgroup spent throttled
STAT = "/proc/stat"
CGROUP_CPU_STAT = "/sys/fs/cgroup/cpu.stat"


def read_stat(path: str | os.PathLike = STAT) -> dict[str, int] | None:
    """runtimes.device_facts.read_proc_stat: {"busy", "idle", "steal", "total", "cpus"} ticks, None if unreadable."""
    return read_proc_stat(path)


def read_throttled_us(path: str | os.PathLike = CGROUP_CPU_STAT) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_usec":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for (an isolated job's worker)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


@dataclass
class Probe:
    stat: dict[str, int] | None
    cpu_s: float
    wall: float
    throttled_us: int | None
    load: list[float] | None
    stat_path: str = STAT
    cgroup_path: str = CGROUP_CPU_STAT

    @classmethod
    def start(cls, stat_path: str | os.PathLike = STAT, cgroup_path: str | os.PathLike = CGROUP_CPU_STAT) -> "Probe":
        return cls(read_stat(stat_path), own_cpu_seconds(), time.monotonic(), read_throttled_us(cgroup_path), _load(),
                   str(stat_path), str(cgroup_path))

    def finish(self, threads: int) -> dict[str, Any]:
        end = read_stat(self.stat_path)
        throttled = read_throttled_us(self.cgroup_path)
        return contention_record(self.stat, end, own_cpu_seconds() - self.cpu_s, time.monotonic() - self.wall, threads,
                                 ticks_per_second=os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100,
                                 throttled_us=None if throttled is None or self.throttled_us is None
                                 else throttled - self.throttled_us,
                                 load=(self.load, _load()))


def contention_record(start: dict | None, end: dict | None, cpu_s: float, wall_s: float, threads: int,
                      ticks_per_second: int = 100, throttled_us: int | None = None, load=(None, None)) -> dict[str, Any]:
    """The three measurements over one job and the verdict (pure: tests feed it fake /proc/stat readings)."""
    threads = max(1, threads)
    record: dict[str, Any] = {"wall_s": round(wall_s, 2), "cpu_s": round(cpu_s, 2), "threads": threads,
                              "own_cpu_share": round(cpu_s / (wall_s * threads), 3) if wall_s > 0 else None,
                              "others_share": None, "others_busy_share": None, "steal_share": None, "cpus": None,
                              "throttled_share": round(throttled_us / 1e6 / wall_s, 3)
                              if throttled_us is not None and wall_s > 0 else None,
                              "load_average_start": load[0], "load_average_end": load[1],
                              "limits": {"others": OTHERS_MAX, "steal": STEAL_MAX, "throttled": THROTTLED_MAX}}
    if start is not None and end is not None and end["total"] > start["total"] and wall_s > 0:
        hz, cpus = float(ticks_per_second), end["cpus"]
        total_s = (end["total"] - start["total"]) / hz
        others_s = max(0.0, (end["busy"] - start["busy"]) / hz - cpu_s)  # everything busy that was not the job
        free_s = max(0, cpus - threads) * wall_s  # CPUs the job left free: others may use them without contending
        record.update(cpus=cpus, others_busy_share=round(others_s / total_s, 3),
                      others_share=round(max(0.0, others_s - free_s) / (threads * wall_s), 3),
                      steal_share=round((end["steal"] - start["steal"]) / hz / total_s, 3))
    reasons = []
    if record["others_share"] is not None and record["others_share"] > OTHERS_MAX:
        reasons.append(f"other processes took {record['others_share']:.0%} of the job's {threads} CPU(s) "
                       f"(limit {OTHERS_MAX:.0%})")
    if record["steal_share"] is not None and record["steal_share"] > STEAL_MAX:
        reasons.append(f"the hypervisor stole {record['steal_share']:.0%} of the CPU time (limit {STEAL_MAX:.0%})")
    if record["throttled_share"] is not None and record["throttled_share"] > THROTTLED_MAX:
        reasons.append(f"the cgroup's CPU quota throttled {record['throttled_share']:.0%} of the wall time "
                       f"(limit {THROTTLED_MAX:.0%})")
    checked = record["others_share"] is not None
    record["contended"] = bool(reasons) if checked or reasons else None
    record["reasons"] = reasons if checked or reasons else ["/proc/stat could not be read: contention not checked"]
    return record


def describe(record: dict[str, Any]) -> str:
    """One line of evidence: 'own CPU 48% of 2 threads x 61 s; others 52%; steal 0%; load 2.9 -> 3.4'."""
    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"
    load = record.get("load_average_start"), record.get("load_average_end")
    load_text = f"; load {load[0][0]:.1f} -> {load[1][0]:.1f}" if load[0] and load[1] else ""
    return (f"own CPU {pct(record['own_cpu_share'])} of {record['threads']} thread(s) x {record['wall_s']:.0f} s; "
            f"other processes {pct(record['others_share'])} of those CPUs; steal {pct(record['steal_share'])}"
            f"{load_text}")
