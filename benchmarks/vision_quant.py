"""CPU vision graph candidates side by side: PyTorch eager fp32 vs each onnxruntime variant, timed interleaved.

    python -m benchmarks.vision_quant [--preset bench-1b] [--runs 5] [--threads 2] [--calibration DIR] [--profile]

Candidates (built once next to the preset's bundle, in vision-candidates/):
  ort fp32                   the bundle's vision.fp32.onnx
  ort int8 weights only      export.onnx.quantize_int8 without attention: the earlier int8 export
  ort fp32 fused             onnxruntime.transformers.optimizer fusions (model_type clip) of the fp32 graph
  ort int8 dyn fused         int8 weights only, of the fused graph
  ort int8 static            quantize_static_int8 (QDQ, per-channel weights) of the fp32 graph, calibrated on
                             synthetic scenes (or --calibration DIR)
  ort int8 static fused      the same on the fused graph
  ort int8 + QK^T             also the attention scores' matmul, both sides quantized on the fly
  ort int8 + QK^T + softmax V ... and the attention-weighted sum
  ort fp32 + MultiHeadAttention       each layer's attention as com.microsoft.MultiHeadAttention (export.onnx.attention)
  ort int8 + MultiHeadAttention       int8 weights of that graph
  ort fp32 + Attention (packed QKV)   com.microsoft.Attention over concatenated Q, K, V weights
  ort int8 + QAttention (packed QKV)  int8 of that graph (the quantizer makes it QAttention)
  ort int8, MultiHeadAttention + one QKV matmul (export)   export.onnx.quantize_int8 as the export runs it
  eager bf16, eager int8 dynamic (torch.ao)                PyTorch variants (torch_candidates)
The fusion and static builders live here, not in export: measured, they do not pay (benchmarks/RESULTS.md).
Every session: graph optimization level ORT_ENABLE_ALL, --threads intra-op threads, sequential execution. Latency is
per image (batch 1): warm-up, then --runs rounds, each timing every candidate once (order rotated per round), so
a load change on a shared machine hits all candidates alike; the table gives medians, ratios to eager, and the
median over rounds of (int8 time / candidate time) in the same round. On a loaded host eager PyTorch slows down far
more than onnxruntime (measured 6x vs 3x at load 5-8 on 2 cores): read the ratios to eager from a quiet run only.
Agreement: per-image-token cosine vs PyTorch fp32 with the graph's own prototype dispatch (export.onnx_validate) on
one N(0, 1) image (the export check's input) and two synthetic scenes of another seed than the calibration.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from export.onnx import INPUT_NAME, int8_nodes


def fuse_graph(fp32_path: Path, out_path: Path) -> dict[str, int]:
    """onnxruntime's own transformer fusions (onnxruntime.transformers.optimizer, model_type "clip", Python fusions
    only: opt_level 0 keeps the graph free of CPU- or GPU-specific ops) -> {fused op: count} of what fired."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = optimize_model(str(fp32_path), model_type="clip", opt_level=0)
    model.save_model_to_file(str(out_path), use_external_data_format=True)  # weights in <out_path>.data
    return {op: n for op, n in model.get_fused_operator_statistics().items() if n}


def rewrite_attention(fp32_path: Path, out_path: Path, packed: bool) -> None:
    """The fp32 graph with each layer's attention as com.microsoft.MultiHeadAttention, or with `packed` as
    com.microsoft.Attention over concatenated Q, K, V weights (export.onnx.attention); weights in <out_path>.data."""
    from export.onnx.attention import write_rewritten

    layers = write_rewritten(fp32_path, out_path, pack="Attention" if packed else None)
    if not layers:
        raise ValueError(f"{fp32_path}: no attention matched the exported pattern; nothing to compare")
    print(f"[vision] {out_path.name}: {layers} layers rewritten", flush=True)


def quantize_static_int8(fp32_path: Path, out_path: Path, images: np.ndarray) -> None:
    """Static (calibrated) int8 in QDQ format: per-channel 7-bit int8 weights (see quantize_int8 for the 7 bits), uint8
    activations with ranges from min/max over `images` (N, 3, S, S) run one by one. The same nodes as quantize_int8:
    weight matmuls and the patch convolution; attention's activation-activation matmuls and the prototype
    clustering stay fp32."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    nodes = int8_nodes(fp32_path)

    class Reader(CalibrationDataReader):  # one image per range: CalibStridedMinMax then keeps one image's tensors
        def __len__(self):
            return len(images)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.batches = iter(images[start_index:end_index])

        def get_next(self):
            image = next(self.batches, None)
            return None if image is None else {INPUT_NAME: image[None].astype(np.float32)}

    quantize_static(fp32_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                    op_types_to_quantize=["MatMul", "Conv"], use_external_data_format=True,
                    calibrate_method=CalibrationMethod.MinMax, extra_options={"CalibStridedMinMax": 1})


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
CALIBRATION_SYNTHETIC = 8  # images made up when no calibration folder is given
CALIBRATION_MAX = 32  # images used from a calibration folder (sorted by name): min/max ranges settle within a few


def calibration_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of a calibration folder (sorted by name, at most CALIBRATION_MAX); a clear error if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {folder} does not exist; pass a folder of images like the ones "
                                "the model will see, or leave the option out to calibrate on synthetic images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)[:CALIBRATION_MAX]
    if not files:
        raise ValueError(f"calibration folder {folder} holds no images ({' '.join(IMAGE_SUFFIXES)}); put a few "
                         "representative images there, or leave the option out to calibrate on synthetic images")
    return files


def calibration_images(config, folder: str | os.PathLike | None = None) -> np.ndarray:
    """Preprocessed calibration images (N, 3, S, S) float32 for the model `config`: the image files of `folder`, or
    seeded synthetic scenes (graded backgrounds, coloured shapes, sensor noise) when folder is None."""
    from sqllava_edge.image import preprocess

    sources = synthetic_images(CALIBRATION_SYNTHETIC, config.vision.image_size) if folder is None else calibration_files(folder)
    return np.stack([preprocess(src, config.vision, config.image_aspect_ratio) for src in sources])


def synthetic_images(count: int, size: int, seed: int = 0) -> list:
    """`count` seeded RGB scenes of `size` px: a two-colour gradient, 2-6 filled shapes, Gaussian pixel noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        a, b = rng.uniform(0, 255, (2, 3))
        ramp = np.linspace(0.0, 1.0, size)[:, None, None] if rng.random() < 0.5 else np.linspace(0.0, 1.0, size)[None, :, None]
        img = Image.fromarray(np.broadcast_to(a + (b - a) * ramp, (size, size, 3)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 7))):
            x0, y0 = rng.uniform(0, size * 0.8, 2)
            w, h = rng.uniform(size * 0.08, size * 0.5, 2)
            box, fill = [x0, y0, min(x0 + w, size - 1), min(y0 + h, size - 1)], tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        noisy = np.asarray(img, dtype=np.float64) + rng.normal(0.0, 8.0, (size, size, 3))
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images


EXPORT_INT8 = "ort int8, MultiHeadAttention + one QKV matmul (export)"


def _candidates(fp32: Path, work: Path, calibration, calibration_tag: str, only=None) -> dict[str, Path]:
    """{table name: graph} (those named in `only`, if given), building the missing ones into `work` (each is written
    whole, then moved into place); a candidate built from another (fused, rewritten) builds that one too."""
    from export.onnx import quantize_int8

    fused = work / "vision.fp32-fused.onnx"
    multihead, packed = work / "vision.fp32-multihead.onnx", work / "vision.fp32-packed.onnx"
    static = work / f"static-{calibration_tag}"  # static graphs depend on the calibration images
    static.mkdir(parents=True, exist_ok=True)
    candidates = {
        "ort fp32": (fp32, None),
        "ort int8 weights only": (work / "vision.int8-weights.onnx", lambda out: quantize_int8(fp32, out, fuse_attention=False)),
        "ort fp32 fused": (fused, lambda out: print(f"[vision] fusions: {fuse_graph(fp32, out)}", flush=True)),
        "ort int8 dyn fused": (work / "vision.int8-fused.onnx", lambda out: quantize_int8(fused, out, fuse_attention=False)),
        "ort int8 static": (static / "vision.int8-static.onnx", lambda out: quantize_static_int8(fp32, out, calibration())),
        "ort int8 static fused": (static / "vision.int8-static-fused.onnx",
                                  lambda out: quantize_static_int8(fused, out, calibration())),
        "ort int8 + QK^T": (work / "vision.int8-scores.onnx",
                                            lambda out: quantize_int8(fp32, out, ("scores",), False)),
        "ort int8 + QK^T + softmax V": (work / "vision.int8-attention.onnx",
                                        lambda out: quantize_int8(fp32, out, ("scores", "values"), False)),
        "ort fp32 + MultiHeadAttention": (multihead, lambda out: rewrite_attention(fp32, out, packed=False)),
        "ort int8 + MultiHeadAttention": (work / "vision.int8-multihead.onnx", lambda out: quantize_int8(multihead, out, fuse_attention=False)),
        "ort fp32 + Attention (packed QKV)": (packed, lambda out: rewrite_attention(fp32, out, packed=True)),
        "ort int8 + QAttention (packed QKV)": (work / "vision.int8-packed.onnx", lambda out: quantize_int8(packed, out, fuse_attention=False)),
        EXPORT_INT8: (work / "vision.int8-export.onnx", lambda out: quantize_int8(fp32, out)),
    }
    sources = {"ort int8 dyn fused": "ort fp32 fused", "ort int8 static fused": "ort fp32 fused",
               "ort int8 + MultiHeadAttention": "ort fp32 + MultiHeadAttention",
               "ort int8 + QAttention (packed QKV)": "ort fp32 + Attention (packed QKV)"}
    if only:
        wanted = set(only) | {sources[name] for name in only if name in sources}
        candidates = {name: c for name, c in candidates.items() if name in wanted}
    for path, build in candidates.values():
        if build is not None and not path.exists():
            print(f"[vision] building {path.name}", flush=True)
            started = time.perf_counter()
            tmp = path.parent / ".tmp"  # built under its final name (external data is found by name), then moved
            tmp.mkdir(exist_ok=True)
            build(tmp / path.name)
            data = tmp / (path.name + ".data")
            if data.exists():
                os.replace(data, path.with_name(data.name))
            os.replace(tmp / path.name, path)  # the graph last: its presence marks a finished build
            print(f"[vision] {path.name} in {time.perf_counter() - started:.0f} s", flush=True)
    return {name: path for name, (path, _) in candidates.items()}


def torch_candidates(graph) -> dict:
    """PyTorch variants of the fp32 graph: the tower's weights and math in bfloat16 (oneDNN's AVX512-BF16 / AMX
    kernels where the CPU has them; the projector stays fp32, as in the fp16 export), and the tower's Linear layers
    as dynamic int8 (torch.ao, fbgemm's VNNI kernels)."""
    import copy

    import torch

    from export.onnx import VisionGraph

    bf16 = VisionGraph(copy.deepcopy(graph.vision).to(torch.bfloat16), graph.projector).eval()
    int8 = VisionGraph(torch.ao.quantization.quantize_dynamic(copy.deepcopy(graph.vision), {torch.nn.Linear},
                                                              dtype=torch.qint8), graph.projector).eval()
    return {"eager bf16": bf16, "eager int8 dynamic (torch.ao)": int8}


def torch_agreement(module, inputs: list[np.ndarray], reference) -> dict:
    """Per-image-token cosine of `module`'s output to PyTorch fp32 (reference.plain: each side with its own
    prototype dispatch, so a flipped dispatch shows here as a low minimum)."""
    import torch

    out = {}
    with torch.no_grad():
        for key, x, ref in zip(("noise", "scenes"), inputs, reference.plain):
            y = module(torch.from_numpy(x)).float().numpy()
            cos = (y * ref).sum(-1) / (np.linalg.norm(y, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
            out[key] = (float(cos.min()), float(cos.mean()))
    return {**out, "dispatch_mismatches": None}


BASELINE_INT8 = "ort int8 weights only"  # the int8 export before the attention rewrite: what the others are paired with


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
    from export.onnx import vision_graph
    from export.onnx_validate import Reference, validate_vision_onnx
    from sqllava_edge.checkpoint import load_checkpoint
    from sqllava_edge.image import preprocess

    calibration_tag = "synthetic"
    if args.calibration:
        try:
            files = calibration_files(args.calibration)
        except (FileNotFoundError, ValueError) as exc:
            parser.error(str(exc))
        listing = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])
        calibration_tag = hashlib.sha256(listing.encode()).hexdigest()[:12]
    torch.set_num_threads(args.threads)
    checkpoint, bundle = ensure_preset(args.preset)
    model, _ = load_checkpoint(checkpoint)
    model.llm = None  # only the vision tower and the projector are measured
    config = model.config
    graph = vision_graph(model, "fp32")
    paths = _candidates(bundle / "vision" / "vision.fp32.onnx", bundle.parent / "vision-candidates", lambda: calibration_images(config, args.calibration),
                        calibration_tag, args.only)
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
    for name, module in torch_candidates(graph).items():
        if args.only and name not in args.only:
            continue
        agreement[name] = torch_agreement(module, inputs, reference)
        runners[name] = lambda m=module: m(torch.from_numpy(image))
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
    base = samples.get(BASELINE_INT8)  # paired: each round's int8 time over the candidate's in the same round
    print(f"| candidate | ms/image | vs eager | vs {BASELINE_INT8} (paired) | cosine min / mean (N(0,1) image) | "
          "cosine min / mean (scenes) |")
    print("|---|---|---|---|---|---|")
    table = []
    for name in names:
        med = float(np.median(samples[name]))
        cos = agreement.get(name)
        cells = [f"{c[0]:.4f} / {c[1]:.4f}" for c in (cos["noise"], cos["scenes"])] if cos else ["(reference)", "(reference)"]
        paired = float(np.median(np.array(base) / np.array(samples[name]))) if base else float("nan")
        print(f"| {name} | {med * 1e3:.0f} | {eager / med:.2f}x | {paired:.2f}x | {cells[0]} | {cells[1]} |")
        table.append({"candidate": name, "median_s": med, "ratio_vs_eager": eager / med, "paired_vs_int8": paired, "samples_s": samples[name],
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
