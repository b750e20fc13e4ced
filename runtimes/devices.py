"""The device backends are chosen for and planned on: `DeviceInfo` (CPU, NVIDIA desktop GPU or Jetson; memory, the CPU
flags that matter, the GPU's engine key), put together from runtimes.device_facts, which reads the machine.

    device = detect_device()             # what this machine offers
    device = resolve_device("cpu")       # None = detect; "cpu" ignores any GPU; "cuda" / "jetson" / "gpu" require one
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from runtimes import device_facts as facts
from sqllava_edge.errors import BackendUnavailableError

INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # CPU features that make int8 matmuls fast


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cuda" (NVIDIA desktop/server GPU), "jetson" (integrated GPU, shared RAM) or "cpu"
    name: str  # GPU name (cuda), board name (jetson) or the CPU model
    ram_available: int  # bytes of RAM available now (MemAvailable); on Jetson the GPU shares it
    gpu_memory_free: int | None = None  # bytes free on a discrete GPU
    compute_capability: str | None = None  # e.g. "8.9"; "8.7" on Jetson Orin
    cpu_flags: frozenset[str] = field(default_factory=frozenset)  # the INT8_CPU_FLAGS and avx2/avx512f this CPU has
    gpu_name: str | None = None  # the CUDA device name (cuDeviceGetName), what export.trt records: "Orin" on Orin
    board: str | None = None  # Jetson only: the board as detect_jetson reads it (information only: containers hide it)
    multiprocessors: int | None = None  # the GPU's multiprocessor count, from the CUDA driver (None: not asked)
    gpu_total_memory: int | None = None  # bytes, cuDeviceTotalMem (on a Jetson the RAM it shares)
    gpu_index: int = 0  # the CUDA device (in CUDA's numbering, after CUDA_VISIBLE_DEVICES) planned and used

    @property
    def engine_key(self) -> dict | None:
        """What a TensorRT engine built for this GPU is keyed on (device_key), None when the CUDA driver was not asked."""
        if None in (self.gpu_name, self.compute_capability, self.multiprocessors, self.gpu_total_memory):
            return None
        return facts.device_key({"name": self.gpu_name, "compute_capability": self.compute_capability,
                                 "multiprocessors": self.multiprocessors, "total_memory": self.gpu_total_memory})

    @property
    def fast_int8(self) -> bool:
        return any(flag in self.cpu_flags for flag in INT8_CPU_FLAGS)

    @property
    def has_gpu(self) -> bool:
        return self.kind in ("cuda", "jetson")


def read_cpu_flags(cpuinfo: str | os.PathLike = facts.CPUINFO) -> frozenset[str]:
    """The CPU flags selection looks at (int8 dot products, AVX2 / AVX-512, ARM dot product / i8mm); empty if unknown."""
    present = set(facts.cpu_flags(facts.read_cpuinfo(cpuinfo)))
    return frozenset(present & {*INT8_CPU_FLAGS, "avx2", "avx512f", "asimddp", "i8mm"})


def _cpu_name(root: Path) -> str:
    return facts.read_cpuinfo(root / "proc/cpuinfo").get("model name") or "CPU"


def _query_nvidia_gpu() -> tuple[dict, int] | None:
    """(cuda_driver_devices entry, free bytes) of the GPU that CUDA numbers 0, the one the memory plan checks and
    llama.cpp (main_gpu, no split), onnxruntime and TensorRT are pinned to; None without a usable CUDA driver.

    Name and capability come from the CUDA driver (honouring CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER); free memory
    from nvidia-smi's row with the same PCI bus id, else the device's total memory (no CUDA context is created here:
    one would hold ~300-400 MiB of GPU memory for the life of the process).
    """
    devices = facts.cuda_driver_devices()
    if not devices:
        return None
    device = devices[0]
    free = facts.nvidia_smi_free(device["pci_bus_id"])
    return device, device["total_memory"] if free is None else free


def _jetson_gpu(root: Path, board: str, query_cuda: bool) -> dict:
    """A Jetson's GPU as cuda_driver_devices describes it when CUDA answers, else name and compute capability from
    the SoC table (the SoC from the device tree or soc0; failing those an "Orin" board, or L4T R36, which supports
    only Orin), without the multiprocessor count and memory that only the driver knows."""
    devices = facts.cuda_driver_devices() if query_cuda else []
    if devices:
        return devices[0]
    soc = facts.tegra_soc(root)
    if soc not in facts.TEGRA_GPUS and ("orin" in board.lower() or (facts.tegra_release(root) or "").startswith("R36 ")):
        soc = "tegra234"
    name, capability = facts.TEGRA_GPUS.get(soc or "", (None, None))
    return {"name": name, "compute_capability": capability}


def detect_device(root: str | os.PathLike = "/", ask_cuda: bool | None = None) -> DeviceInfo:
    """What this machine offers. `root` lets tests point /proc, /sys and /etc at a fake tree; the CUDA driver is asked
    on the real tree only, unless ask_cuda says otherwise (tests with a fake driver)."""
    root = Path(root)
    flags = read_cpu_flags(root / "proc/cpuinfo")
    ram = facts.read_meminfo(root / "proc/meminfo").get("MemAvailable", 0)
    real = root == Path("/") if ask_cuda is None else ask_cuda
    jetson = facts.detect_jetson(root)
    if jetson is not None:
        gpu = _jetson_gpu(root, jetson, real)
        return DeviceInfo("jetson", jetson, ram, compute_capability=gpu["compute_capability"], cpu_flags=flags,
                          gpu_name=gpu["name"], board=jetson, multiprocessors=gpu.get("multiprocessors"),
                          gpu_total_memory=gpu.get("total_memory"), gpu_index=gpu.get("index", 0))
    found = _query_nvidia_gpu() if real else None
    if found is not None:
        gpu, free = found
        return DeviceInfo("cuda", gpu["name"], ram, gpu_memory_free=free, compute_capability=gpu["compute_capability"],
                          cpu_flags=flags, gpu_name=gpu["name"], multiprocessors=gpu["multiprocessors"],
                          gpu_total_memory=gpu["total_memory"], gpu_index=gpu["index"])
    return DeviceInfo("cpu", _cpu_name(root), ram, cpu_flags=flags)


def resolve_device(device: str | DeviceInfo | None) -> DeviceInfo:
    """None = detect; "cpu" = ignore any GPU; "cuda" / "jetson" = require that kind of device."""
    if isinstance(device, DeviceInfo):
        return device
    found = detect_device()
    if device is None:
        return found
    if device == "cpu":
        return DeviceInfo("cpu", _cpu_name(Path("/")), found.ram_available, cpu_flags=found.cpu_flags)
    if device in ("cuda", "jetson", "gpu"):
        if not found.has_gpu or (device != "gpu" and found.kind != device):
            raise BackendUnavailableError(
                f"device {device!r} was requested but this machine is {found.kind} ({found.name}): no NVIDIA "
                f"{'Jetson' if device == 'jetson' else 'GPU'} was found (the CUDA driver libcuda, /etc/nv_tegra_release, "
                "the device tree, /sys/devices/soc0); use device='cpu' or leave device unset"
            )
        return found
    raise ValueError(f"unknown device {device!r}; valid: None (auto), 'cpu', 'cuda', 'jetson', 'gpu'")
