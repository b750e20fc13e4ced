"""Bundle fp16 vision ONNX -> TensorRT engine, built on the target GPU / Jetson, recorded in the manifest.

    python -m export.trt BUNDLE [--max-batch 4] [--workspace-gb 2]   # on the device: build, validate, record
    python -m export.trt BUNDLE --check                                # anywhere (CPU): static ONNX check only

Portable recipe for TensorRT 10 (JetPack 6.1 / 6.2) and 11 (edge-deployment.md section 5): the ONNX is already fp16
where it should be (export.onnx), and the network is built STRONGLY_TYPED, so no BuilderFlag.FP16 (removed in TRT 11)
is needed. TensorRT 8.6 (JetPack 6.0) has no STRONGLY_TYPED flag and is refused with a one-line error. One
optimization profile over the batch (1 / max/2 / max), a timing cache kept beside the engine, and the engine is
checked against the fp32 ONNX in onnxruntime before anything is written. Engines are not portable across GPUs or
TensorRT versions: each is keyed on the device key (runtimes.device_facts.device_key: CUDA name, compute capability,
multiprocessor count, total memory, the same on the host and in a container) and the TensorRT version, which name
its file and timing cache, so one bundle holds an engine per device (an AGX Orin's next to an Orin Nano's). The
manifest records them with the JetPack/L4T release and the board, the latter for reading only.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from runtimes.device_facts import cuda_driver_devices, device_key, jetson_release

INPUT_NAME, OUTPUT_NAME = "pixel_values", "image_embeds"
# Engine vs the fp32 ONNX: MEAN per-token cosine. Not the minimum: the prototype extractor's argmax dispatch flips at
# float ties (export/onnx_validate.py), which alone brings single tokens to ~0.992 with random weights.
ENGINE_MIN_COSINE = 0.99

# ONNX operators TensorRT's ONNX parser supports, from onnx/onnx-tensorrt docs/operators.md (TensorRT 10.x table,
# rows marked "Y"). Operators first defined after opset 20 are left out: we target the oldest TensorRT we deploy to,
# 10.3 on JetPack 6.1/6.2, whose parser reads opsets 9..20 (TensorRT 10.0 release notes / support matrix).
TRT_MIN_OPSET, TRT_MAX_OPSET = 9, 20
TRT_SUPPORTED_OPS = frozenset("""
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow Cast
    CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND
    Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU
    HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool
    Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus
    Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu
    Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape
    Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum Tan
    Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Inputs that operators.md requires to be build-time constants ("`axes` must be an initializer"): op -> input index.
CONSTANT_INPUTS = {**{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                       "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
                                       "Squeeze", "Unsqueeze", "CumSum")}, "Slice": 3, "TopK": 1}
# ONNX TensorProto element types TensorRT can hold (operators.md header; DOUBLE is cast down, with a warning).
TRT_DTYPES = {1: "FLOAT", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE",
              16: "BFLOAT16"}

INSTALL_TENSORRT = (
    "TensorRT is not installed in this Python. On a Jetson it comes with JetPack 6.1 or 6.2 (TensorRT 10.3; JetPack "
    "6.0's TensorRT 8.6 is too old; `sudo apt install python3-libnvinfer`, or run inside an NVIDIA l4t container for "
    "JetPack 6.1+); on an x86 machine with an NVIDIA "
    "GPU: `pip install tensorrt --extra-index-url https://pypi.nvidia.com` (TensorRT 10.x or 11.x). The plain PyPI "
    "`tensorrt` package only downloads from NVIDIA's index. To check the ONNX graph without TensorRT: "
    "python -m export.trt BUNDLE --check"
)
NO_GPU = (
    "no CUDA GPU is visible here ({why}). Build the engine on the target machine (an NVIDIA GPU or a Jetson) from the "
    "bundle's fp16 ONNX: engines are not portable across GPUs or TensorRT versions. To check the graph on this "
    "machine: python -m export.trt BUNDLE --check"
)


# ----------------------------------------------------------------------------------------------------------------
# Static check (CPU only, needs `onnx`)


@dataclass
class CheckReport:
    path: str
    opset: int
    ops: dict[str, int]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.path}: opset {self.opset}, {sum(self.ops.values())} nodes, {len(self.ops)} operator types"
        if self.ok:
            lines = [f"OK   {head}: TensorRT 10.3+ parses every operator (opset {TRT_MIN_OPSET}..{TRT_MAX_OPSET})"]
        else:
            lines = [f"FAIL {head}"] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def check_onnx(path: str | Path) -> CheckReport:
    """Check that TensorRT's ONNX parser can take the graph: opset range, operators, constant axes, shapes, dtypes."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # OSError, protobuf's DecodeError
        raise ValueError(f"{path} is not a readable ONNX model ({exc})") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    report = CheckReport(str(path), opset, {})
    if not TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET:
        report.problems.append(f"default-domain opset {opset} is outside {TRT_MIN_OPSET}..{TRT_MAX_OPSET}, the range "
                               "TensorRT 10.3 (JetPack 6.1+) parses; re-export with opset <= 20")
    functions = {(f.domain, f.name): f for f in model.functions}
    ops: collections.Counter = collections.Counter()
    unsupported: dict[str, list[str]] = {}
    _check_nodes(model.graph, functions, ops, unsupported, report, constants=_constant_names(model.graph))
    report.ops = dict(sorted(ops.items()))
    for op, nodes in unsupported.items():
        custom = "::" in op
        why = ("is a custom-domain operator (e.g. an onnxruntime contrib op); TensorRT has no parser for it" if custom
               else "is not supported by TensorRT's ONNX parser")
        report.problems.append(f"operator {op} {why} ({len(nodes)} node(s), e.g. {nodes[0]})")
    _check_io(model.graph, report)
    return report


def _constant_names(graph) -> set[str]:
    return {t.name for t in graph.initializer} | {out for n in graph.node if n.op_type == "Constant" for out in n.output}


def _check_nodes(graph, functions, ops, unsupported: dict[str, list[str]], report: CheckReport, constants: set[str]) -> None:
    import onnx

    for node in graph.node:
        label = f"node {node.name or '(unnamed)'}"
        if (node.domain, node.op_type) in functions:  # model-local function: the parser inlines its body
            body = functions[node.domain, node.op_type]
            inner = onnx.helper.make_graph(list(body.node), body.name, [], [])
            _check_nodes(inner, functions, ops, unsupported, report, constants)
            continue
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        ops[op] += 1
        if op not in TRT_SUPPORTED_OPS:
            unsupported.setdefault(op, []).append(node.name or "(unnamed)")
        index = CONSTANT_INPUTS.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
            report.problems.append(f"{label}: {node.op_type} input {index} ({node.input[index]}) must be a constant for TensorRT")
        for attr in node.attribute:  # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_nodes(sub, functions, ops, unsupported, report, constants | _constant_names(sub))


def _check_io(graph, report: CheckReport) -> None:
    initializer_names = {t.name for t in graph.initializer}
    for value in list(graph.input) + list(graph.output):
        if value.name in initializer_names:
            continue
        tensor = value.type.tensor_type
        if tensor.elem_type not in TRT_DTYPES:
            report.problems.append(f"graph tensor {value.name}: element type {tensor.elem_type} is not a TensorRT type")
        dynamic = [i for i, d in enumerate(tensor.shape.dim) if not d.HasField("dim_value")]
        if value in graph.input and [i for i in dynamic if i != 0]:
            report.problems.append(f"input {value.name}: dimensions {dynamic} are dynamic; the optimization profile only "
                                   "varies the batch (dimension 0)")
    for tensor in graph.initializer:
        if tensor.data_type not in TRT_DTYPES:
            report.problems.append(f"initializer {tensor.name}: element type {tensor.data_type} is not a TensorRT type")
        elif tensor.data_type == 11:
            report.notes.append(f"initializer {tensor.name} is DOUBLE: TensorRT casts it to FLOAT")


# ----------------------------------------------------------------------------------------------------------------
# TensorRT (the GPU and the Jetson release are runtimes.device_facts')


def require_tensorrt():
    """The tensorrt module, >= 10 (raises BackendUnavailableError saying what to install or upgrade)."""
    from runtimes.vision import check_tensorrt_version
    from sqllava_edge.errors import BackendUnavailableError

    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(INSTALL_TENSORRT) from None
    check_tensorrt_version(tensorrt)  # TensorRT 8.6 (JetPack 6.0) has no STRONGLY_TYPED flag
    return tensorrt


# ----------------------------------------------------------------------------------------------------------------
# Build


def build_engine(bundle: str | Path, *, max_batch: int = 4, workspace_gb: float = 2.0, log: Callable[[str], None] = print):
    """Build, validate and record a TensorRT engine for BUNDLE's fp16 vision ONNX; returns the new Artifact."""
    from sqllava_edge.bundle import Artifact, read_manifest, write_manifest
    from sqllava_edge.errors import BackendUnavailableError, BundleError
    from sqllava_edge.fileutil import atomic_write

    if max_batch < 1 or workspace_gb <= 0:
        raise ValueError("--max-batch must be >= 1 and --workspace-gb > 0")
    trt = require_tensorrt()  # first: say what to install before any work
    devices = cuda_driver_devices()  # CUDA's numbering: device 0 is the one the runtimes use
    if not devices:
        raise BackendUnavailableError(NO_GPU.format(why="no NVIDIA driver or no device"))
    device = devices[0]
    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True)
    onnx_artifact = manifest.find("vision_onnx", "fp16")
    if onnx_artifact is None:
        raise BundleError(f"{bundle} has no fp16 vision ONNX; re-export with: python -m export CKPT --out {bundle} --vision-precision fp16 ...")
    report = check_onnx(bundle / onnx_artifact.path)
    if not report.ok:
        raise BundleError("the fp16 ONNX cannot be parsed by TensorRT:\n" + report.summary())
    key = device_key(device)
    stem = f"trt/vision.{engine_stem(key)}.trt{trt.__version__}"  # one engine and timing cache per device key
    cache_path = bundle / f"{stem}.timing-cache"
    size = manifest.preprocessing["image_size"]
    log(f"[trt] building a strongly typed engine on {device['name']} (sm {device['compute_capability']}, "
        f"{key['multiprocessors']} multiprocessors, {key['total_memory'] / 2**30:.1f} GiB), TensorRT {trt.__version__}")
    engine, cache = _build_serialized(trt, bundle / onnx_artifact.path, size, max_batch, workspace_gb, cache_path, log)
    validation = _validate_engine(trt, engine, bundle, manifest, max_batch)  # from memory: nothing is written before
    with atomic_write(bundle / f"{stem}.engine") as handle:  # a failed validation leaves no file the manifest omits
        handle.write(engine)
    with atomic_write(cache_path) as handle:
        handle.write(cache)
    target = {"gpu": device["name"], "compute_capability": device["compute_capability"], "device_key": key,
              "tensorrt": trt.__version__, "jetson": jetson_release(), "max_batch": max_batch,
              "profile": {"min": 1, "opt": max(1, max_batch // 2), "max": max_batch}, "workspace_gb": workspace_gb,
              "strongly_typed": True, "source_onnx": onnx_artifact.path}
    artifact = Artifact.from_files(bundle, "tensorrt_engine", f"{stem}.engine", [f"{stem}.engine", f"{stem}.timing-cache"],
                                   "fp16", validation, target, inputs_key=onnx_artifact.sha256[onnx_artifact.path])
    replaced = manifest.add(artifact)
    write_manifest(bundle, manifest)
    kept = {name for other in manifest.artifacts for name in other.files}
    for old in replaced:  # the same device key's engine under an older name: its files now belong to no entry
        for name in set(old.files) - kept:
            (bundle / name).unlink(missing_ok=True)
    log(f"[trt] wrote {artifact.path} ({artifact.size / 2**20:.1f} MiB) and updated the manifest")
    return artifact


def engine_stem(key: dict) -> str:
    """A file-name part unique per device key: the CUDA name, then a digest of the whole key ("orin-8b41c0d2e7"), so
    an AGX Orin and an Orin Nano (both "Orin", 8.7) write different engines and timing caches in one bundle."""
    import hashlib
    import json

    slug = re.sub(r"[^a-z0-9]+", "-", key["gpu"].lower()).strip("-")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def _build_serialized(trt, onnx_path: Path, size: int, max_batch: int, workspace_gb: float, cache_path: Path,
                      log: Callable[[str], None] = print):
    """TensorRT 10/11 documented API: strongly typed network from ONNX, batch profile, timing cache.

    The timing cache file is this device key's own (build_engine names it so). It is set with ignore_mismatch=False
    and TensorRT's answer is checked: a cache it refuses (recorded on another device, or by another TensorRT) is
    replaced by a fresh one instead of being ignored silently."""
    from sqllava_edge.errors import ExportValidationError

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads the .onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportValidationError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"[trt] TensorRT refused the timing cache {cache_path.name} (recorded on another device or TensorRT "
            "version); building with a fresh one")
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise ExportValidationError("TensorRT refused even an empty timing cache; see its log above")
    profile = builder.create_optimization_profile()
    shape = lambda batch: (batch, 3, size, size)  # noqa: E731
    profile.set_shape(INPUT_NAME, shape(1), shape(max(1, max_batch // 2)), shape(max_batch))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportValidationError("TensorRT failed to build the engine (see its log above); try a larger --workspace-gb")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def _validate_engine(trt, engine: bytes, bundle: Path, manifest, max_batch: int) -> dict:
    """Engine vs the fp32 ONNX in onnxruntime at batch 1 and max_batch: mean per-token cosine >= ENGINE_MIN_COSINE.

    The engine runs through the runtime's own TensorRT backend (CUDA torch or cuda-python buffers), from memory.
    """
    import numpy as np

    from runtimes.vision import TensorRTVision, cuda_buffers_problem
    from sqllava_edge.errors import ExportValidationError

    reference = manifest.find("vision_onnx", "fp32")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"skipped": f"needs onnxruntime for the comparison ({exc})"}
    problem = cuda_buffers_problem()
    if reference is None or problem is not None:
        return {"skipped": f"needs the fp32 ONNX in the bundle and CUDA buffers (CUDA torch or cuda-python): {problem}"}
    session = ort.InferenceSession(str(bundle / reference.path), providers=["CPUExecutionProvider"])
    runner = TensorRTVision.from_bytes(engine, "the new engine", trt=trt)
    size, rng, report = manifest.preprocessing["image_size"], np.random.default_rng(0), {"reference": reference.path}
    try:
        for batch in sorted({1, max_batch}):
            x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            ref = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            try:
                got = runner.encode(x).astype(np.float64)
            except RuntimeError as exc:
                raise ExportValidationError(f"TensorRT engine failed to run at batch {batch}: {exc}") from None
            cos = (got * ref).sum(-1) / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1), 1e-30)
            report[f"batch_{batch}"] = {"max_abs_diff": float(np.abs(got - ref).max()), "cosine_min": float(cos.min()),
                                        "cosine_mean": float(cos.mean())}
            if not np.isfinite(got).all() or cos.mean() < ENGINE_MIN_COSINE:
                raise ExportValidationError(f"TensorRT engine: tensor {OUTPUT_NAME} at batch {batch} has mean per-token "
                                            f"cosine {cos.mean():.4f} vs the fp32 ONNX, below the tolerance {ENGINE_MIN_COSINE}")
    finally:
        runner.close()
    report.update(tolerance={"cosine_mean": ENGINE_MIN_COSINE}, passed=True)
    return report


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _onnx_to_check(target: Path) -> Path:
    """BUNDLE -> its fp16 vision ONNX; a path to an .onnx file is checked as is."""
    from sqllava_edge.bundle import read_manifest
    from sqllava_edge.errors import BundleError

    if target.is_file() and target.suffix == ".onnx":
        return target
    manifest = read_manifest(target, verify=True)
    artifact = manifest.find("vision_onnx", "fp16")
    if artifact is None:
        raise BundleError(f"{target} has no fp16 vision ONNX (the one TensorRT builds from); re-export with --vision-precision fp16")
    return target / artifact.path


def main(argv: list[str] | None = None) -> int:
    from sqllava_edge.errors import BackendUnavailableError, SQLLaVAError

    parser = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", help="bundle folder (from python -m export); with --check also a path to an .onnx file")
    parser.add_argument("--max-batch", type=int, default=4, help="largest batch of the optimization profile (1 / max/2 / max)")
    parser.add_argument("--workspace-gb", type=float, default=2.0, help="TensorRT builder workspace limit in GiB")
    parser.add_argument("--check", action="store_true", help="only check statically (on CPU) that TensorRT supports every operator")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error("--max-batch must be >= 1")
    if args.workspace_gb <= 0:
        parser.error("--workspace-gb must be > 0")
    try:
        if args.check:
            report = check_onnx(_onnx_to_check(Path(args.bundle)))
            print(report.summary())
            return 0 if report.ok else 1
        build_engine(args.bundle, max_batch=args.max_batch, workspace_gb=args.workspace_gb)
    except BackendUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (SQLLaVAError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
