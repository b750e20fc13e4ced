"""CPU vision graph candidates side by side: PyTorch eager fp32 vs each onnxruntime variant, timed interleaved.

    python -m benchmarks.vision_quant [--preset bench-1b] [--runs 5] [--threads 2] [--calibration DIR] [--profile]

Candidates (built once next to the preset's bundle, in vision-candidates/):
  ort fp32            the bundle's vision.fp32.onnx
  ort int8 dynamic    the bundle's vision.int8.onnx (export.onnx.quantize_int8)
  ort fp32 fused      onnxruntime.transformers.optimizer fusions (model_type clip) of the fp32 graph
  ort int8 dyn fused  quantize_int8 of the fused graph
  ort int8 static     quantize_static_int8 (QDQ, per-channel weights) of the fp32 graph, calibrated on synthetic
                      scenes (or --calibration DIR)
  ort int8 static fused  the same on the fused graph
  ort int8 dyn + QK^T       quantize_int8 also quantizing the attention scores' matmul (Q K^T, both sides dynamic)
  ort int8 dyn + attention  ... and softmax @ V
Every session: graph optimization level ORT_ENABLE_ALL, --threads intra-op threads, sequential execution. Latency is
per image (batch 1): warm-up, then --runs rounds, each timing every candidate once (order rotated per round), so
a load change on a shared machine hits all candidates alike; the table gives medians and ratios to eager.
Agreement: per-image-token cosine vs PyTorch fp32 with the graph's own prototype dispatch (export.onnx_validate) on
one N(0, 1) image (the export check's input) and two synthetic scenes of another seed than the calibration.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def _candidates(fp32: Path, int8: Path, work: Path, calibration) -> dict[str, Path]:
    from export.onnx import fuse_graph, quantize_int8, quantize_static_int8

    work.mkdir(parents=True, exist_ok=True)
    fused = work / "vision.fp32-fused.onnx"
    steps = [(fused, lambda out: print(f"[vision] fusions: {fuse_graph(fp32, out)}", flush=True)),
             (work / "vision.int8-fused.onnx", lambda out: quantize_int8(fused, out)),
             (work / "vision.int8-static.onnx", lambda out: quantize_static_int8(fp32, out, calibration())),
             (work / "vision.int8-static-fused.onnx", lambda out: quantize_static_int8(fused, out, calibration())),
             (work / "vision.int8-scores.onnx", lambda out: quantize_int8(fp32, out, ("scores",))),
             (work / "vision.int8-attention.onnx", lambda out: quantize_int8(fp32, out, ("scores", "values")))]
    for path, build in steps:
        if not path.exists():
            print(f"[vision] building {path.name}", flush=True)
            started = time.perf_counter()
            tmp = work / ".tmp"  # built under its final name (external data is found by name), then moved
            tmp.mkdir(exist_ok=True)
            build(tmp / path.name)
            data = tmp / (path.name + ".data")
            if data.exists():
                os.replace(data, path.with_name(data.name))
            os.replace(tmp / path.name, path)  # the graph last: its presence marks a finished build
            print(f"[vision] {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return {"ort fp32": fp32, "ort int8 dynamic": int8, "ort fp32 fused": fused,
            "ort int8 dyn fused": steps[1][0], "ort int8 static": steps[2][0], "ort int8 static fused": steps[3][0],
            "ort int8 dyn + QK^T": steps[4][0], "ort int8 dyn + attention": steps[5][0]}


def _session(path: Path, threads: int, profile: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.enable_profiling = profile
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _profile(path: Path, threads: int, image: np.ndarray) -> list[tuple[str, float]]:
    """Share of node time per op type over one run after a warm-up (onnxruntime's profiler)."""
    session = _session(path, threads, profile=True)
    for _ in range(2):
        session.run(None, {"pixel_values": image})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"] if runs else 0
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + e["dur"]
    whole = sum(totals.values()) or 1.0
    return sorted(((op, t / whole) for op, t in totals.items()), key=lambda x: -x[1])[:6]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vision_quant", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench-1b")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine (default 2)")
    parser.add_argument("--calibration", help="folder of calibration images for the static candidates (default: synthetic)")
    parser.add_argument("--only", nargs="+", help="measure only these candidates (names as in the table, e.g. 'ort fp32')")
    parser.add_argument("--profile", action="store_true", help="also print each candidate's top op types by time")
    parser.add_argument("--json", type=Path, help="write the raw samples and the table here")
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm

    from benchmarks.presets import ensure_preset
    from export.onnx import calibration_images, synthetic_images, vision_graph
    from export.onnx_validate import Reference, validate_vision_onnx
    from sqllava_edge.checkpoint import load_checkpoint
    from sqllava_edge.image import preprocess

    torch.set_num_threads(args.threads)
    checkpoint, bundle = ensure_preset(args.preset)
    model, _ = load_checkpoint(checkpoint)
    model.llm = None  # only the vision tower and the projector are measured
    config = model.config
    graph = vision_graph(model, "fp32")
    paths = _candidates(bundle / "vision" / "vision.fp32.onnx", bundle / "vision" / "vision.int8.onnx",
                        bundle.parent / "vision-candidates", lambda: calibration_images(config, args.calibration))
    if args.only:
        paths = {name: p for name, p in paths.items() if name in args.only}

    rng = np.random.default_rng(0)
    size = config.vision.image_size
    scenes = np.stack([preprocess(img, config.vision, config.image_aspect_ratio) for img in synthetic_images(2, size, seed=1)])
    inputs = [rng.standard_normal((1, 3, size, size)).astype(np.float32), scenes]
    print("[vision] PyTorch fp32 reference", flush=True)
    reference = Reference(graph, inputs)
    agreement = {}
    for name, path in tqdm(paths.items(), desc="agreement", unit="graph"):
        report = validate_vision_onnx(path, "fp16", inputs, reference)  # "fp16": numbers reported, no tolerance
        agreement[name] = {"noise": (report["batch_1"]["cosine_min"], report["batch_1"]["cosine_mean"]),
                           "scenes": (report["batch_2"]["cosine_min"], report["batch_2"]["cosine_mean"]),
                           "dispatch_mismatches": report["dispatch_mismatches"]}

    image = inputs[0]
    sessions = {name: _session(path, args.threads) for name, path in paths.items()}
    runners = {"eager fp32": lambda: graph(torch.from_numpy(image))}
    runners.update({name: (lambda s=s: s.run(None, {"pixel_values": image})) for name, s in sessions.items()})
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in tqdm(names, desc="warm-up", unit="graph"):
            runners[name]()
        for r in tqdm(range(args.runs), desc="rounds", unit="round"):
            for name in names[r % len(names):] + names[: r % len(names)]:
                started = time.perf_counter()
                runners[name]()
                samples[name].append(time.perf_counter() - started)
    load = os.getloadavg()
    eager = float(np.median(samples["eager fp32"]))
    print(f"\n{args.preset} vision graph, batch 1, {args.threads} threads, median of {args.runs} interleaved rounds; "
          f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| candidate | ms/image | vs eager | cosine min / mean (N(0,1) image) | cosine min / mean (scenes) |")
    print("|---|---|---|---|---|")
    table = []
    for name in names:
        med = float(np.median(samples[name]))
        cos = agreement.get(name)
        cells = [f"{c[0]:.4f} / {c[1]:.4f}" for c in (cos["noise"], cos["scenes"])] if cos else ["(reference)", "(reference)"]
        print(f"| {name} | {med * 1e3:.0f} | {eager / med:.2f}x | {cells[0]} | {cells[1]} |")
        table.append({"candidate": name, "median_s": med, "ratio_vs_eager": eager / med, "samples_s": samples[name],
                      "agreement": cos})
    if args.profile:
        for name, path in paths.items():
            top = ", ".join(f"{op} {share:.0%}" for op, share in _profile(path, args.threads, image))
            print(f"[profile] {name}: {top}")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "threads": args.threads, "load_after": load,
                                         "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
