"""The machine a benchmark ran on, recorded with the numbers (edge-deployment.md 7.4: speeds nobody can reproduce).

    facts = machine_facts(threads=2)          # CPU model and flags, cores, memory, GPU and driver, Jetson power mode
    bw = measure_bandwidth(threads=2)         # STREAM-like copy and triad in this process, GB/s

Everything here is best effort: a fact that cannot be read is recorded as None, never guessed.
"""
from __future__ import annotations

import os
import platform
import sys
import threading
import time
from importlib import metadata
from typing import Any

import numpy as np

# CPU features that decide which kernels the engines use (x86 "flags", ARM "Features").
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "fphp")
LIBRARIES = ("numpy", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "llama_cpp_python", "gguf")


def cpu_facts() -> dict[str, Any]:
    """Model and identity (vendor, family / model / stepping, flags hash), flags (all, and the SIMD ones that
    matter), logical CPUs, the CPUs this process may use, caches."""
    from runtimes.device_facts import cpu_identity, cpu_sysfs, read_cpuinfo, usable_cores

    fields = read_cpuinfo()
    identity = cpu_identity(fields)
    flags = identity["flags"]
    return {
        "model": identity["model_name"] or platform.processor() or None,
        "vendor": identity["vendor"],
        "family": identity["family"],
        "model_number": identity["model"],
        "stepping": identity["stepping"],
        "flags_sha256": identity["flags_sha256"],
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cores(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "flags": flags,
        "hypervisor": "hypervisor" in flags,
        "mhz_reported": float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
        **cpu_sysfs(),  # governor, l2_cache, l3_cache
    }


def _cache_bytes(text: str | None) -> int:
    """'300M' / '4096K' (sysfs cache size) -> bytes; 0 if unknown."""
    if not text:
        return 0
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip()
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except ValueError:
        return 0


def memory_facts() -> dict[str, Any]:
    from runtimes.device_facts import read_meminfo

    meminfo = read_meminfo()
    return {"total_bytes": meminfo.get("MemTotal"), "available_bytes": meminfo.get("MemAvailable"),
            "swap_bytes": meminfo.get("SwapTotal")}


def gpu_facts() -> dict[str, Any] | None:
    """NVIDIA GPU name, driver, memory and clocks from nvidia-smi; None on a machine without one."""
    from runtimes.device_facts import nvidia_smi_gpus

    return nvidia_smi_gpus()


def jetson_facts(root: str | os.PathLike = "/") -> dict[str, Any] | None:
    """Board model, L4T release, JetPack version and the nvpmodel power mode; None when not on a Jetson (recognised
    as runtimes.device_facts.detect_jetson does: also an Orin NX devkit, or a container that shows only soc0).
    root: where /proc, /sys and /etc are (tests); the JetPack tools are asked on this machine."""
    from runtimes.device_facts import detect_jetson, jetson_tools, tegra_release

    board = detect_jetson(root)
    if board is None:
        return None
    tools = jetson_tools()
    return {"model": board, "l4t_release": tegra_release(root) or None, "jetpack": tools["jetpack"],
            "power_mode": tools["power_mode"],  # e.g. "NV Power Mode: MAXN\n0"
            "clocks": tools["clocks"]}  # needs root; None otherwise


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_facts(threads: int) -> dict[str, Any]:
    """Everything needed to judge and reproduce a number: hardware, OS, libraries, load, threads used."""
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_facts(),
        "memory": memory_facts(),
        "gpu": gpu_facts(),
        "jetson": jetson_facts(),
        "libraries": library_versions(),
        "threads_used": threads,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------------------------------------------------
# Memory bandwidth (STREAM-like: copy a = b, triad a = b + s * c, float64, counted as STREAM counts them)

_TRIAD_BLOCK = 1 << 17  # 128 Ki float64 = 1 MiB: s * c of one block stays in L2, so memory sees read b, c and write a


def default_array_bytes() -> int:
    """Per-array size: 3 arrays >= 4x the last-level cache (STREAM's rule), at least 64 MiB, at most 1/8 of free RAM."""
    cache = _cache_bytes(cpu_facts()["l3_cache"]) or _cache_bytes(cpu_facts()["l2_cache"])
    want = max(64 * 2**20, (4 * cache) // 3)
    free = memory_facts()["available_bytes"] or 8 * 2**30
    return int(min(want, free // 8))


def _copy(a: np.ndarray, b: np.ndarray, lo: int, hi: int, scratch) -> None:
    np.copyto(a[lo:hi], b[lo:hi])


def _read_kernel(a: np.ndarray, b: np.ndarray, lo: int, hi: int, scratch, out: list) -> None:
    out.append(float(np.dot(a[lo:hi], b[lo:hi])))  # BLAS dot: streams both slices, writes nothing


def _triad(a: np.ndarray, b: np.ndarray, c: np.ndarray, lo: int, hi: int, scratch: np.ndarray, s: float = 3.0) -> None:
    for start in range(lo, hi, _TRIAD_BLOCK):
        end = min(hi, start + _TRIAD_BLOCK)
        tmp = scratch[: end - start]
        np.multiply(c[start:end], s, out=tmp)  # in cache
        np.add(b[start:end], tmp, out=a[start:end])


def _timed_parallel(threads: int, n: int, work) -> float:
    """Seconds for `threads` threads to each run work(lo, hi, scratch) over their slice of n elements."""
    bounds = np.linspace(0, n, threads + 1).astype(int)
    scratch = [np.empty(_TRIAD_BLOCK) for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    done = threading.Barrier(threads + 1)

    def run(i: int) -> None:
        barrier.wait()
        work(int(bounds[i]), int(bounds[i + 1]), scratch[i])  # numpy releases the GIL on large loops
        done.wait()

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    done.wait()
    elapsed = time.perf_counter() - start
    for t in pool:
        t.join()
    return elapsed


def measure_bandwidth(threads: int, array_bytes: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """STREAM-like copy, triad and a read-only dot with `threads` threads. GB/s = 1e9 bytes/s; the best of `repeats`
    is the figure (as STREAM reports it), every sample is kept. Copy moves 16 B/element, triad 24 (STREAM's counting,
    write-allocate traffic not counted), read 16."""
    array_bytes = array_bytes or default_array_bytes()
    n = max(_TRIAD_BLOCK, array_bytes // 8)
    a, b, c = np.zeros(n), np.full(n, 1.0), np.full(n, 2.0)  # written once: pages are mapped before timing
    sink: list[float] = []
    kernels = {"copy": (16, lambda lo, hi, s: _copy(a, b, lo, hi, s)),
               "triad": (24, lambda lo, hi, s: _triad(a, b, c, lo, hi, s)),
               "read": (16, lambda lo, hi, s: _read_kernel(b, c, lo, hi, s, sink))}
    result: dict[str, Any] = {"threads": threads, "array_mib": round(n * 8 / 2**20, 1), "repeats": repeats,
                              "method": "numpy, float64, threads over contiguous slices; triad blocked through L2"}
    for name, (bytes_per_element, work) in kernels.items():
        _timed_parallel(threads, n, work)  # warm-up
        seconds = [_timed_parallel(threads, n, work) for _ in range(repeats)]
        rates = [bytes_per_element * n / s / 1e9 for s in seconds]
        result[name] = {"best_gbps": round(max(rates), 3), "median_gbps": round(float(np.median(rates)), 3),
                        "samples_gbps": [round(r, 3) for r in rates]}
    if not np.allclose(a[:4], 1.0 + 3.0 * 2.0):
        raise RuntimeError("bandwidth triad produced wrong values; numpy is misbehaving")
    # The roofline uses the best kernel: the highest bandwidth this machine showed is the strictest limit to compare to.
    best = max(("copy", "triad", "read"), key=lambda k: result[k]["best_gbps"])
    result["gbps"], result["roofline_kernel"] = result[best]["best_gbps"], best
    return result


def machine_label(run: dict) -> str:
    """'AMD EPYC, family 25 model 17 stepping 1, 2 CPUs [3f2a9c1d] (2026-12-03, 1b6a329)' with what is known."""
    m = run["machine"]
    name = m.get("model_name") or m.get("described_as") or "CPU not recorded"
    ids = ", ".join(f"{k} {m[k]}" for k in ("family", "model", "stepping") if m.get(k) is not None)
    cpus = f", {m['logical_cpus']} CPUs" if m.get("logical_cpus") else ""
    when = ", ".join(x for x in (run.get("date") or "date not recorded", run.get("commit")) if x)
    return f"{name}{', ' + ids if ids else ''}{cpus} [{m.get('id') or 'id unknown'}] ({when})"
