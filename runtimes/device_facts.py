"""What the CPU is, read from /proc/cpuinfo once, for every part that needs to know: the tuning cache key
(runtimes.tune) and the benchmark's machine record and fingerprint (benchmarks.machine).

    fields = read_cpuinfo()                  # the first processor's "key: value" lines, plus "processors"
    identity = cpu_identity(fields)          # vendor, family / model / stepping, model name, flags and their hash
    fingerprint_id(identity, cores=2)        # 8 hex digits naming the CPU type and core count (None if unknown)

Linux x86 writes "vendor_id", "cpu family", "model", "stepping", "model name" and "flags"; ARM writes "CPU implementer",
"CPU architecture", "CPU part", "CPU revision" and "Features". A field the file does not have is None, never guessed.

    read_proc_stat()                         # the CPUs' tick counters (busy, idle, steal): how busy the machine is
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CPUINFO = "/proc/cpuinfo"
# (identity key, x86 field, ARM field)
_IDENTITY_FIELDS = (("vendor", "vendor_id", "CPU implementer"), ("family", "cpu family", "CPU architecture"),
                    ("model", "model", "CPU part"), ("stepping", "stepping", "CPU revision"),
                    ("model_name", "model name", "Model"))


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first value of every "key : value" line (the first processor's), and "processors": how many blocks."""
    fields: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        processors += key == "processor"
        fields.setdefault(key, value.strip())
    if processors:
        fields["processors"] = str(processors)
    return fields


def read_cpuinfo(path: str | os.PathLike = CPUINFO) -> dict[str, str]:
    """parse_cpuinfo of the file; {} where it cannot be read (not Linux)."""
    try:
        return parse_cpuinfo(Path(path).read_text(errors="replace"))
    except OSError:
        return {}


def cpu_flags(fields: dict[str, str]) -> list[str]:
    """The CPU's feature flags in file order (x86 "flags", ARM "Features")."""
    return (fields.get("flags") or fields.get("Features") or "").split()


def flags_sha256(flags: list[str]) -> str:
    """16 hex digits of sha256 over the sorted flag list: two CPUs with the same features hash alike."""
    return hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]


def cpu_identity(fields: dict[str, str]) -> dict[str, Any]:
    """{"vendor", "family", "model", "stepping", "model_name", "flags", "flags_sha256"}; None for what is missing.
    family / model / stepping are ints where the file writes decimal (x86) and strings otherwise (ARM hex ids)."""
    out: dict[str, Any] = {}
    for key, x86, arm in _IDENTITY_FIELDS:
        value = fields.get(x86) if fields.get(x86) not in (None, "") else fields.get(arm)
        if key in ("family", "model", "stepping") and value is not None and value.isdigit():
            value = int(value)
        out[key] = value if value not in (None, "") else None
    flags = cpu_flags(fields)
    out["flags"] = flags
    out["flags_sha256"] = flags_sha256(flags) if flags else None
    return out


def fingerprint_id(identity: dict[str, Any], cores: int | None) -> str | None:
    """8 hex digits over vendor, family, model, stepping, model name, the flags hash and the core count: the same
    CPU type with the same cores gets the same id. None when nothing identifies the CPU (vendor, family, model and
    flags all unknown): an id over nothing would make unknown machines look alike."""
    keys = ("vendor", "family", "model", "stepping", "model_name", "flags_sha256")
    if all(identity.get(k) is None for k in ("vendor", "family", "model", "flags_sha256")):
        return None
    blob = {k: identity.get(k) for k in keys} | {"cores": cores}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:8]


def read_proc_stat(path: str | os.PathLike = "/proc/stat") -> dict[str, int] | None:
    """Ticks of all CPUs from the "cpu" line of /proc/stat -> {"busy", "idle", "steal", "total", "cpus"}; None if the
    file cannot be read or does not start with that line. busy = user + nice + system + irq + softirq (guest time is
    inside user); idle includes iowait; total is all eight, steal included; cpus counts the "cpuN" lines."""
    try:
        lines = Path(path).read_text().splitlines()
        fields = lines[0].split()
        if fields[0] != "cpu":
            return None
        v = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        v += [0] * (8 - len(v))  # kernels before 2.6.11 stop earlier
    except (OSError, ValueError, IndexError):
        return None
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return {"busy": v[0] + v[1] + v[2] + v[5] + v[6], "idle": v[3] + v[4], "steal": v[7], "total": sum(v),
            "cpus": cpus or 1}
