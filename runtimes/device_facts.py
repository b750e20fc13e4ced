"""What this machine is, read in this one module: the CPU (/proc/cpuinfo, sysfs), memory (/proc/meminfo), load
(/proc/stat), an NVIDIA GPU (the CUDA driver library, nvidia-smi) and a Jetson (device tree, /sys/devices/soc0,
/etc/nv_tegra_release, the JetPack tools). Selection (runtimes.devices), tuning (runtimes.tune), export.trt and the
benchmarks' machine record (benchmarks.machine) all ask here. A fact that cannot be read is None / empty, never guessed.

    fields = read_cpuinfo()                  # the first processor's "key: value" lines, plus "processors"
    identity = cpu_identity(fields)          # vendor, family / model / stepping, model name, flags and their hash
    fingerprint_id(identity, cores=2)        # 8 hex digits naming the CPU type and core count (None if unknown)
    read_proc_stat()                         # the CPUs' tick counters (busy, idle, steal): how busy the machine is
    read_meminfo()["MemAvailable"]           # bytes
    detect_jetson()                          # the Jetson board name, None elsewhere; jetson_release(): L4T / JetPack
    cuda_driver_devices()                    # CUDA's devices from libcuda (no toolkit, no torch, no context)

Linux x86 writes "vendor_id", "cpu family", "model", "stepping", "model name" and "flags"; ARM writes "CPU implementer",
"CPU architecture", "CPU part", "CPU revision" and "Features". A field the file does not have is None, never guessed.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
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


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), else all the OS reports."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_sysfs(root: str | os.PathLike = "/") -> dict[str, str | None]:
    """CPU 0's frequency governor and L2 / L3 cache sizes as sysfs writes them ("performance", "2048K"); None each
    where sysfs does not say."""
    cpu0 = Path(root) / "sys/devices/system/cpu/cpu0"
    files = {"governor": "cpufreq/scaling_governor", "l2_cache": "cache/index2/size", "l3_cache": "cache/index3/size"}
    return {key: (_read(cpu0 / name) or "").strip() or None for key, name in files.items()}


def _read(path: str | os.PathLike) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


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


# --------------------------------------------------------------------------------------------------------------------
# Memory, and the command-line tools the facts below ask


def read_meminfo(path: str | os.PathLike = "/proc/meminfo") -> dict[str, int]:
    """Every "Key: N kB" line of /proc/meminfo in bytes ({} if the file cannot be read)."""
    values = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024  # kB
    return values


def tool_output(*command: str, timeout: float = 10) -> str | None:
    """What a command-line tool prints (stripped), None when it is missing, fails or times out."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


# --------------------------------------------------------------------------------------------------------------------
# Jetson

# Tegra SoC -> (CUDA device name as cuDeviceGetName reports it, compute capability), for when CUDA itself cannot be
# asked (no libcuda in a container): Orin is "Orin", 8.7 (edge-deployment.md section 5). JetPack 6.1+ is Orin only.
TEGRA_GPUS = {"tegra234": ("Orin", "8.7")}
TEGRA_CHIP_IDS = {35: "tegra234"}  # /sys/devices/soc0/soc_id: the chip id (0x23 = T234, Orin)
# L4T release -> JetPack release (NVIDIA JetPack archive). Unknown L4T versions are recorded as L4T only.
JETPACK_FOR_L4T = {"35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3", "35.6.0": "5.1.4", "36.3.0": "6.0",
                   "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1"}


def _device_tree_strings(path: Path) -> list[str]:
    """A device-tree string-list property (NUL-separated), [] when absent or unreadable."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace").strip() for part in raw.split(b"\x00") if part.strip()]


def tegra_soc(root: str | os.PathLike = "/") -> str | None:
    """The Tegra SoC ("tegra234" on Orin) from the device tree's `compatible` list, else /sys/devices/soc0.

    Containers often see no /etc/nv_tegra_release, and Docker masks /sys/firmware (behind /proc/device-tree), but
    /sys/devices/soc0 (family "Tegra", soc_id = chip id) stays visible.
    """
    root = Path(root)
    for entry in _device_tree_strings(root / "proc/device-tree/compatible"):
        match = re.fullmatch(r"nvidia,(tegra\d+)", entry)
        if match:
            return match.group(1)
    soc0 = root / "sys/devices/soc0"
    family = _device_tree_strings(soc0 / "family")
    if family and family[0].lower() == "tegra":
        ids = _device_tree_strings(soc0 / "soc_id")
        chip = int(ids[0]) if ids and ids[0].isdigit() else None
        return TEGRA_CHIP_IDS.get(chip, "tegra") if chip is not None else "tegra"
    return None


def tegra_release(root: str | os.PathLike = "/") -> str | None:
    """The first line of /etc/nv_tegra_release without its "# " ("R36 (release), REVISION: 4.3, ..."); None when
    the file is absent or unreadable (containers often lack it)."""
    text = _read(Path(root) / "etc/nv_tegra_release")
    if text is None:
        return None
    lines = text.splitlines()
    return lines[0].lstrip("# ").strip() if lines else ""


def detect_jetson(root: str | os.PathLike = "/") -> str | None:
    """The Jetson board name (/proc/device-tree/model), None elsewhere.

    A Jetson is recognised by a Tegra SoC (device tree `compatible`, /sys/devices/soc0), "Jetson" in the model, or
    /etc/nv_tegra_release: an Orin NX devkit's model is "NVIDIA Orin NX Developer Kit", without "Jetson".
    """
    root = Path(root)
    model = _device_tree_strings(root / "proc/device-tree/model")
    name = model[0] if model else ""
    release = tegra_release(root)
    soc = tegra_soc(root)
    if soc is None and "jetson" not in name.lower() and release is None:
        return None
    if name:
        return name
    if release is not None:
        return f"NVIDIA Jetson ({release})" if release else "NVIDIA Jetson"
    return f"NVIDIA Jetson ({soc})"


def jetson_release(root: str | os.PathLike = "/") -> dict | None:
    """{"l4t": "36.4.3", "jetpack": "6.2", "board": ...} on a Jetson, None elsewhere.

    The board is named as detect_jetson reads it, for people to read: a container hides or renames it, so engines
    are matched on the CUDA device key instead. A container without /etc/nv_tegra_release is still a Jetson, with an
    unknown L4T release.
    """
    board = detect_jetson(root)
    if board is None:
        return None
    first = tegra_release(root)
    if not first:
        return {"l4t": None, "jetpack": None, "board": board}
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    if not match:
        return {"l4t": None, "jetpack": None, "board": board, "raw": first}
    l4t = f"{match.group(1)}.{match.group(2)}"
    l4t = l4t if l4t.count(".") == 2 else l4t + ".0"
    return {"l4t": l4t, "jetpack": JETPACK_FOR_L4T.get(l4t), "board": board}


def jetson_tools() -> dict[str, str | None]:
    """What the JetPack tools say: the nvidia-jetpack package version, the nvpmodel power mode ("NV Power Mode:
    MAXN\n0") and jetson_clocks (root only); None each where a tool is missing or refuses."""
    return {"jetpack": tool_output("dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"),
            "power_mode": tool_output("nvpmodel", "-q"), "clocks": tool_output("jetson_clocks", "--show")}


# --------------------------------------------------------------------------------------------------------------------
# NVIDIA GPU: the CUDA driver library, nvidia-smi


def device_key(device: dict) -> dict:
    """The identity of a GPU that TensorRT engines and timing caches are keyed on: what the CUDA driver reports, the
    same on the host and inside a container (name, compute capability, multiprocessor count, total memory).

    The board string is not part of it: Docker hides /proc/device-tree, so one Jetson reads "NVIDIA Jetson AGX Orin
    Developer Kit" on the host and "NVIDIA Jetson (tegra234)" in an l4t container, while two Orin boards built in
    containers would read alike. The driver tells an AGX Orin (16 or 14 multiprocessors, 64 / 32 GB) from an Orin NX or
    Nano (8 or 4, 16 / 8 / 4 GB) wherever it runs. device: a cuda_driver_devices() entry.
    """
    return {"gpu": device["name"], "compute_capability": device["compute_capability"],
            "multiprocessors": int(device["multiprocessors"]), "total_memory": int(device["total_memory"])}


def _load_libcuda():
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_driver_devices(lib=None) -> list[dict]:
    """The CUDA devices in CUDA's own numbering (CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER applied, fastest first by
    default), via the driver library: no toolkit, no torch, no context. [] without a usable driver.

    Each: index, name (cuDeviceGetName: "Orin" on Jetson Orin), compute_capability, multiprocessors, pci_bus_id,
    total_memory. lib: a loaded libcuda (tests pass a fake).
    """
    lib = lib if lib is not None else _load_libcuda()
    if lib is None or lib.cuInit(0) != 0:
        return []
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    devices = []
    for index in range(count.value):
        dev, major, minor, sms = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        total = ctypes.c_size_t(0)
        name, bus = ctypes.create_string_buffer(256), ctypes.create_string_buffer(32)
        if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
            continue
        lib.cuDeviceGetName(name, 256, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
        lib.cuDeviceGetAttribute(ctypes.byref(sms), 16, dev)  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        lib.cuDeviceGetPCIBusId(bus, 32, dev)  # "domain:bus:device.function"; empty on a Jetson's integrated GPU
        lib.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
        devices.append({"index": index, "name": name.value.decode(errors="replace"),
                        "compute_capability": f"{major.value}.{minor.value}", "multiprocessors": int(sms.value),
                        "pci_bus_id": bus.value.decode(errors="replace"), "total_memory": int(total.value)})
    return devices


def _pci_key(bus_id: str) -> tuple[int, ...] | None:
    """'00000000:01:00.0' (nvidia-smi) and '0000:01:00.0' (CUDA) -> the same key."""
    match = re.fullmatch(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-9a-fA-F]+)", bus_id.strip())
    return tuple(int(part, 16) for part in match.groups()) if match else None


def nvidia_smi_free(bus_id: str) -> int | None:
    """Free bytes of the GPU at this PCI bus id, from nvidia-smi (which lists GPUs in PCI order, ignoring
    CUDA_VISIBLE_DEVICES: so the row is picked by bus id, never by position). None if unknown."""
    if _pci_key(bus_id) is None:
        return None
    out = tool_output("nvidia-smi", "--query-gpu=pci.bus_id,memory.free", "--format=csv,noheader,nounits")
    for line in (out or "").splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and _pci_key(parts[0]) == _pci_key(bus_id):
            try:
                return int(float(parts[1])) * 2**20
            except ValueError:
                return None
    return None


def nvidia_smi_gpus() -> dict[str, Any] | None:
    """Every GPU's name, driver, memory and clocks, and the CUDA version of the driver, from nvidia-smi; None on a
    machine without it."""
    out = tool_output("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,compute_cap",
                      "--format=csv,noheader,nounits")
    if not out:
        return None
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 6:
            gpus.append(dict(zip(("name", "driver", "memory_mib", "max_sm_clock_mhz", "power_limit_w",
                                  "compute_capability"), parts)))
    banner = tool_output("nvidia-smi")
    version = banner.split("CUDA Version:")[1].split()[0] if banner and "CUDA Version:" in banner else None
    return {"gpus": gpus, "cuda_driver_version": version}


def nvidia_smi_process_mib(pid: int) -> float | None:
    """GPU memory nvidia-smi attributes to process `pid` (MiB), None when it lists none."""
    listing = tool_output("nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    for line in (listing or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return None
