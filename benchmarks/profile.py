"""Operator-level profiles of the vision encode, for the "where does the time go" part of the report.

  onnx_vision_profile(path, pixels, threads)    onnxruntime's own profiler: node times summed by operator type
  torch_vision_profile(model, pixels)           torch.profiler: self CPU time by aten operator

Both profile one encode after one un-profiled warm-up and return the top operators with their share of the total.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

TOP = 8


def _top(totals_us: dict[str, float]) -> dict:
    total = sum(totals_us.values())
    ranked = sorted(totals_us.items(), key=lambda kv: -kv[1])
    return {"total_ms": total / 1000, "ops": [{"op": op, "ms": us / 1000, "share": us / total if total else 0.0}
                                              for op, us in ranked[:TOP]]}


def onnx_vision_profile(onnx_path: str | os.PathLike, pixels: np.ndarray, threads: int) -> dict:
    """(B, 3, S, S) float32 through the ONNX with onnxruntime profiling on (CPU provider)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="sqllava-ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "vision")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        session.run(None, {name: pixels})  # warm-up (its events are dropped below by run index)
        session.run(None, {name: pixels})
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else 0  # only the second run's nodes
    totals: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["ts"] >= start and event["name"].endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + float(event["dur"])
    return _top(totals)


def torch_vision_profile(model, pixels: np.ndarray) -> dict:
    """model.encode_images under torch.profiler (CPU): self time by aten operator."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    x = torch.from_numpy(pixels)
    with torch.inference_mode():
        model.encode_images(x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.encode_images(x)
    totals = {e.key: float(e.self_cpu_time_total) for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return _top(totals)
