"""Memory plan before loading: weights + vision engine + KV cache for n_ctx + workspace, against the device's memory.

Refusing with a clear message (and what would fit instead) beats being killed by the OOM killer, which on an 8 GB
Jetson can take the whole board down (edge-deployment.md section 7.1). On Jetson the GPU shares the RAM, so
everything is planned against one pool; on a desktop GPU the offloaded LLM and a CUDA vision engine count against
GPU memory and the rest against RAM. A partly offloaded LLM counts only its offloaded layers' share of weights and KV
cache against the GPU. Whatever uses CUDA also costs the process's CUDA context and the kernels its libraries load
(hundreds of MiB even with lazy loading, out of the shared RAM on a Jetson), counted as "CUDA context + libraries".
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqllava_edge.config import LLMConfig, ModelConfig
from sqllava_edge.errors import MemoryPlanError

GIB = 2**30
HEADROOM = 0.10  # keep 10% of the available memory free for the OS, Python and allocator slack
MIN_HEADROOM = 256 * 2**20
LLAMA_CPP_BATCH = 512  # n_batch: sizes llama.cpp's compute buffer
# One CUDA context per process: ~290-430 MiB with lazy module loading (CUDA >= 11.7 default), as PyTorch measured it
# (pytorch#86509, #107667); more without it. Estimates, to keep a plan from running an 8 GB Orin Nano to the OOM killer.
CUDA_CONTEXT_BYTES = 400 * 2**20
CUDA_LIBRARY_BYTES = 150 * 2**20  # each GPU library in use: llama.cpp's CUDA backend + cuBLAS, onnxruntime/cuDNN, TensorRT


def kv_cache_bytes(llm: LLMConfig, n_ctx: int, bytes_per_value: int = 2) -> int:
    """K and V for every layer and position: 2 * layers * n_ctx * kv_heads * head_dim * bytes (edge-deployment 6)."""
    return 2 * llm.num_layers * n_ctx * llm.num_kv_heads * llm.head_dim * bytes_per_value


def torch_weight_bytes(config: ModelConfig, part: str, bytes_per_value: int = 4) -> int:
    """Parameter bytes of the PyTorch "llm" or "vision" (tower + projector) part, from the config alone."""
    if part == "llm":
        m = config.llm
        attn = m.hidden_size * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)  # q, o + k, v
        layer = attn + 3 * m.hidden_size * m.intermediate_size + 2 * m.hidden_size
        count = 2 * m.vocab_size * m.hidden_size + m.num_layers * layer + m.hidden_size  # untied embed + lm_head
    elif part == "vision":
        v, h = config.vision, config.llm.hidden_size
        layer = 4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size + 9 * v.hidden_size
        tower = 3 * v.patch_size**2 * v.hidden_size + (v.num_patches + 2) * v.hidden_size + v.layers_used * layer
        count = tower + 3 * v.hidden_size**2 + v.hidden_size * h + h * h  # projector (cluster: c, v, f + MLP)
    else:
        raise ValueError(f"part must be 'llm' or 'vision', got {part!r}")
    return count * bytes_per_value


def llm_workspace_bytes(llm: LLMConfig, n_batch: int = LLAMA_CPP_BATCH) -> int:
    """Rough compute-buffer estimate: logits for a batch plus a few hidden-sized activations per row, + 64 MiB."""
    return n_batch * (llm.vocab_size + 8 * llm.intermediate_size) * 4 + 64 * 2**20


def vision_workspace_bytes(config: ModelConfig, batch: int = 1) -> int:
    """Activations of one vision forward: attention scores (heads * P^2) and MLP rows in fp32, + 32 MiB."""
    v = config.vision
    tokens = v.num_patches + 1
    return batch * (v.num_heads * tokens * tokens + 4 * tokens * v.intermediate_size) * 4 + 32 * 2**20


@dataclass(frozen=True)
class Pool:
    name: str  # "RAM", "RAM (shared with the GPU)" or "GPU memory"
    available: int  # bytes
    needs: dict[str, int] = field(default_factory=dict)  # what goes here -> bytes

    @property
    def total(self) -> int:
        return sum(self.needs.values())

    @property
    def budget(self) -> int:
        return self.available - max(int(self.available * HEADROOM), MIN_HEADROOM)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget


@dataclass(frozen=True)
class MemoryPlan:
    pools: tuple[Pool, ...]
    kv_per_token: int  # bytes of KV cache per context position
    n_ctx: int

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.pools)

    def describe(self) -> str:
        lines = []
        for pool in self.pools:
            parts = ", ".join(f"{name} {_gib(size)}" for name, size in pool.needs.items())
            verdict = "fits" if pool.fits else "does NOT fit"
            lines.append(f"{pool.name}: needs {_gib(pool.total)} ({parts}); {_gib(pool.available)} available, "
                         f"{_gib(pool.budget)} usable after headroom: {verdict}")
        return "\n".join(lines)

    def max_n_ctx(self) -> int:
        """The longest context that would fit with everything else unchanged (0 if nothing would)."""
        longest = None
        for pool in self.pools:
            kv = pool.needs.get("KV cache")
            if kv:  # a partly offloaded LLM has its share of the KV cache in each pool
                room = pool.budget - (pool.total - kv)
                fits = max(0, int(room // (kv / self.n_ctx)))
                longest = fits if longest is None else min(longest, fits)
        return longest or 0

    @property
    def vision_bytes(self) -> int:
        """What the plan reserves for the vision part (weights + workspace): the cap for onnxruntime's CUDA arena."""
        return sum(p.needs.get("vision weights", 0) + p.needs.get("vision workspace", 0) for p in self.pools)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 2**20:.1f} MiB"


def plan_memory(config: ModelConfig, device, *, llm_bytes: int, vision_bytes: int, n_ctx: int, kv_bytes_per_value: int,
                llm_on_gpu: bool = False, vision_on_gpu: bool = False, llm_gpu_share: float = 1.0,
                ram_available: int | None = None, gpu_available: int | None = None) -> MemoryPlan:
    """Place each part in a pool. device: runtimes.devices.DeviceInfo; the *_available overrides are for tests.

    llm_gpu_share: the fraction of the LLM's layers offloaded when llm_on_gpu (llama.cpp gpu_layers / num_layers).
    """
    if not 0.0 <= llm_gpu_share <= 1.0:
        raise ValueError(f"llm_gpu_share must lie in [0, 1], got {llm_gpu_share}")
    ram = device.ram_available if ram_available is None else ram_available
    kv = kv_cache_bytes(config.llm, n_ctx, kv_bytes_per_value)
    per_token = kv_cache_bytes(config.llm, 1, kv_bytes_per_value)
    vision_part = {"vision weights": vision_bytes, "vision workspace": vision_workspace_bytes(config)}
    share = llm_gpu_share if llm_on_gpu else 0.0
    llm_gpu = {"LLM weights": int(llm_bytes * share), "KV cache": int(kv * share),
               "LLM workspace": llm_workspace_bytes(config.llm)} if share > 0 else {}
    llm_cpu = {"LLM weights": llm_bytes - int(llm_bytes * share), "KV cache": kv - int(kv * share)} if share < 1 else {}
    if not llm_gpu:
        llm_cpu["LLM workspace"] = llm_workspace_bytes(config.llm)
    users = int(bool(llm_gpu)) + int(vision_on_gpu)  # GPU libraries in this process
    cuda = {"CUDA context + libraries": CUDA_CONTEXT_BYTES + users * CUDA_LIBRARY_BYTES} if users else {}
    if device.kind == "jetson":
        return MemoryPlan((Pool("RAM (shared with the GPU)", ram, _merge(llm_gpu, llm_cpu, vision_part, cuda)),),
                          per_token, n_ctx)
    if device.kind == "cuda" and users:
        gpu = device.gpu_memory_free if gpu_available is None else gpu_available
        on_gpu = _merge(llm_gpu, vision_part if vision_on_gpu else {}, cuda)
        on_cpu = _merge(llm_cpu, {} if vision_on_gpu else vision_part)
        pools = [Pool("GPU memory", gpu or 0, on_gpu)] + ([Pool("RAM", ram, on_cpu)] if on_cpu else [])
        return MemoryPlan(tuple(pools), per_token, n_ctx)
    return MemoryPlan((Pool("RAM", ram, _merge(llm_cpu, llm_gpu, vision_part)),), per_token, n_ctx)


def _merge(*parts: dict[str, int]) -> dict[str, int]:
    """Sum the parts by name (an LLM split between GPU and CPU lands in one pool on a Jetson or a CPU)."""
    out: dict[str, int] = {}
    for part in parts:
        for name, size in part.items():
            out[name] = out.get(name, 0) + size
    return out


def check_plan(plan: MemoryPlan, smaller: list[tuple[str, int]] = ()) -> None:
    """Raise MemoryPlanError with what to change if the plan does not fit.

    smaller: (precision, bytes) of smaller LLM weights the bundle also has, to suggest them.
    """
    if plan.fits:
        return
    tips = []
    pool = next(p for p in plan.pools if not p.fits)
    over = pool.total - pool.budget
    weights = pool.needs.get("LLM weights")
    for precision, size in smaller:
        if weights is not None and weights - size >= over:
            tips.append(f"a smaller LLM quantization: llm_precision={precision!r} (saves {_gib(weights - size)})")
            break
    longest = plan.max_n_ctx()
    if "KV cache" in pool.needs and longest > 0:
        tips.append(f"a shorter context: n_ctx={min(longest, plan.n_ctx - 1)} or less")
    if not tips:
        tips.append("a smaller LLM quantization (python -m export CHECKPOINT --out BUNDLE --quant q4_k_m) or a device with more memory")
    raise MemoryPlanError(f"loading would need {_gib(pool.total)} of {pool.name} but only {_gib(pool.budget)} is usable "
                          f"({_gib(over)} short).\n{plan.describe()}\nTry " + "; or ".join(tips) + ".")
