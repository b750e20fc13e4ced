"""Speed settings the trainers share; each is measured on and off by `python -m benchmarks.train`.

Everything here changes how fast a step runs, never what it computes beyond float rounding: the tests compare the
losses of a few steps with and without each one (tests/test_training.py, tests/test_pretrain_llm.py).
"""
from __future__ import annotations

import torch

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # torch >= 2.4 has a fused AdamW kernel for both


def fused_adamw_supported(device=None) -> bool:
    kind = torch.device(device).type if device is not None else "cpu"
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return kind in FUSED_ADAMW_DEVICES and (major, minor) >= (2, 4)


def adamw_kwargs(fused: bool | None, device=None, fsdp: bool = False) -> dict:
    """AdamW keyword arguments for `fused` (None = on where this torch has the kernel for `device`; off under FSDP,
    whose flat-parameter views we have not checked the fused kernel on). The fused kernel runs the same update as
    the default multi-tensor one in one pass over each parameter: several times faster on a CPU, where the
    multi-tensor path makes a pass per arithmetic operation (measured in training/RESULTS.md)."""
    if fused is None:
        fused = fused_adamw_supported(device) and not fsdp
    elif fused and not fused_adamw_supported(device):
        raise ValueError(f"fused AdamW needs torch >= 2.4 on one of {', '.join(FUSED_ADAMW_DEVICES)}; this is "
                         f"torch {torch.__version__} on {torch.device(device or 'cpu').type}: pass --no-fused-adamw")
    return {"fused": True} if fused else {"foreach": None}
