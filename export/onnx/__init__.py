"""Vision tower + projector -> one ONNX graph `vision`, in fp32, fp16 and int8, each validated against PyTorch.

    python -m export.onnx CHECKPOINT --out FOLDER [--precision fp32 fp16 int8]

Graph: input `pixel_values` (B, 3, S, S) float32 -> output `image_embeds` (B, T, H) float32, B dynamic.
  * exporter: torch.onnx's dynamo exporter at opset 20 (the highest TensorRT 10.0-10.3 / JetPack 6 parses). On our
    graph it gives a cleaner result than the legacy exporter at opset 17 (no Identity/Constant chains, static T in
    the output shape, fewer Shape/Gather nodes); both export it, but only dynamo is used.
  * the tower runs only to the selected layer (VisionTower), the prototype extractor uses a fixed pooling matrix and
    one-hot matmuls (model.py): no adaptive pooling and no data-dependent shapes, so TensorRT can build it.
  * fp16 (for TensorRT, strongly typed): the CLIP tower's weights and math in fp16; the input is cast to fp16 inside
    the graph and the tower's output back to fp32, so the prototype extractor (token-axis L2 norms that overflow fp16,
    hard argmax dispatch) runs in fp32. Inputs and outputs stay float32 for every variant.
  * int8 (for CPUs): onnxruntime dynamic quantization of the fp32 graph: int8 weights, activations quantized on the
    fly. The prototype extractor's clustering/dispatch nodes stay fp32 (a flipped argmax moves a whole token); its
    output MLP and the tower are quantized. It is quantized from the fp32 graph with each tower layer's attention as
    onnxruntime's MultiHeadAttention and Q, K, V as one matmul (export.onnx.attention; onnxruntime-only operators,
    so only this CPU graph holds them). Static QDQ, onnxruntime's transformer fusions and int8 attention matmuls
    were measured against it and did not pay (benchmarks/RESULTS.md, python -m benchmarks.vision_quant).
Validation right after export, at batch 1 and 3, vs the PyTorch fp32 module on seeded inputs (export.onnx_validate:
the prototype extractor's argmax dispatch is compared separately, values with the graph's own dispatch):
  fp32 max |diff| <= 1e-4 and dispatch differences only at float32 ties; int8 per-image-token cosine >= 0.99;
  fp16 numbers are reported (and must be finite).
"""
from __future__ import annotations

import ast
import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from export.onnx_validate import INPUT_NAME, OUTPUT_NAME, Reference, validate_vision_onnx
from sqllava_edge.bundle import Artifact

PRECISIONS = ("fp32", "fp16", "int8")
OPSET = 20  # TensorRT 10.0-10.3 parse opsets 9..20 (onnx-tensorrt docs/operators.md)
VALIDATION_BATCHES = (1, 3)
_KEEP_FP32_IN_INT8 = "projector"  # name scope kept in fp32 by the int8 quantizer ...
_QUANTIZE_IN_INT8 = "projector.mlp"  # ... except this sub-scope (the output MLP, continuous in its input)


class VisionGraph(nn.Module):
    """What the ONNX graph computes: pixel_values (B, 3, S, S) float32 -> image_embeds (B, T, H) float32."""

    def __init__(self, vision: nn.Module, projector: nn.Module):
        super().__init__()
        self.vision = vision  # VisionTower: casts its input to its own weights' dtype
        self.projector = projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feats = self.vision(pixel_values)  # (B, T, D) in the tower's dtype
        return self.projector(feats.float()).float()  # (B, T, H)


def vision_graph(model, precision: str) -> VisionGraph:
    """The export module for `precision`, built from (copies of) a merged SQLLaVA's parts; `model` is not changed."""
    vision, projector = model.vision, model.projector
    if hasattr(vision.clip, "peft_config"):
        raise ValueError("the vision tower still carries LoRA adapters; merge first (export.merge.merge_model)")
    projector = copy.deepcopy(projector).float().cpu().eval()
    if precision == "fp16":
        vision = copy.deepcopy(vision).half()
    elif next(vision.parameters()).dtype != torch.float32:
        vision = copy.deepcopy(vision).float()
    return VisionGraph(vision.cpu().eval(), projector).eval()


def export_vision_onnx(
    model,
    bundle_dir: str | os.PathLike,
    precisions: Sequence[str] = PRECISIONS,
    *,
    keys: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Artifact]:
    """Write vision/vision.<precision>.onnx into `bundle_dir` for each precision, validate each, describe them.

    `model` is a merged SQLLaVA (no adapters). `keys` maps precision -> inputs_key recorded in the artifact.
    Raises ExportValidationError (naming tensor and tolerance) if a variant disagrees with PyTorch.
    """
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown or not precisions:
        raise ValueError(f"unknown vision precision(s) {unknown or '(none given)'}; choose from {', '.join(PRECISIONS)}")
    bundle_dir = Path(bundle_dir)
    (bundle_dir / "vision").mkdir(parents=True, exist_ok=True)
    size = model.config.vision.image_size
    inputs = _validation_inputs(size)
    reference_graph = vision_graph(model, "fp32")
    reference = Reference(reference_graph, inputs)
    artifacts = []
    scratch = Path(tempfile.mkdtemp(prefix=".onnx-work-", dir=bundle_dir))
    try:
        fp32_path = _onnx_path(bundle_dir if "fp32" in precisions else scratch, "fp32")
        if "fp32" in precisions or "int8" in precisions:
            log("[onnx] exporting fp32 graph")
            export_graph(reference_graph, fp32_path, size)
        for precision in [p for p in PRECISIONS if p in precisions]:
            path = _onnx_path(bundle_dir, precision)
            if precision == "fp16":
                log("[onnx] exporting fp16 graph")
                export_graph(vision_graph(model, "fp16"), path, size)
            elif precision == "int8":
                log("[onnx] quantizing int8 (onnxruntime dynamic quantization)")
                quantize_int8(fp32_path, path)
            log(f"[onnx] validating {precision} at batch {', '.join(map(str, VALIDATION_BATCHES))}")
            report = validate_vision_onnx(path, precision, inputs, reference)
            report["exporter"] = f"torch.onnx dynamo, opset {OPSET}"
            files = [p.relative_to(bundle_dir).as_posix() for p in _onnx_files(path)]
            artifacts.append(Artifact.from_files(bundle_dir, "vision_onnx", files[0], files, precision, report,
                                                 inputs_key=(keys or {}).get(precision, "")))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return artifacts


def _onnx_path(folder: Path, precision: str) -> Path:
    return folder / "vision" / f"vision.{precision}.onnx"


def _onnx_files(path: Path) -> list[Path]:
    """The graph file first, then its external-data file if the exporter wrote one."""
    data = path.with_name(path.name + ".data")
    return [path] + ([data] if data.exists() else [])


STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata the dynamo exporter writes: file paths and line numbers


def export_graph(graph: VisionGraph, path: Path, image_size: int) -> None:
    """torch.onnx (dynamo) export with a dynamic batch; weights in `<path>.data` beside the graph."""
    import onnx  # noqa: F401  (the exporter needs it; fail here with the import error if missing)

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: a batch of 1 could be specialised away
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes={INPUT_NAME: {0: batch}}, opset_version=OPSET, dynamo=True,
                          external_data=True, verbose=False)
    drop_stack_traces(path)


def drop_stack_traces(path: Path) -> None:
    """Remove the exporter's per-node Python stack traces from an ONNX graph file (its weights file is untouched).
    They hold the exporting machine's file paths and source line numbers, so without them the same checkpoint gives
    the same bytes from any checkout, and a bundle does not carry the builder's folders. The name scopes the int8
    step reads (`_scopes`) stay."""
    import onnx

    from sqllava_edge.fileutil import atomic_write

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    with atomic_write(path) as handle:
        handle.write(model.SerializeToString())


def quantize_int8(fp32_path: Path, out_path: Path, attention: Sequence[str] = (), fuse_attention: bool = True) -> None:
    """Dynamic int8 quantization (weights int8, activations per batch) keeping the prototype clustering in fp32.

    Weights use 7 bits (reduce_range): onnxruntime's u8s8 kernels on x86 CPUs without VNNI (AVX2, plain AVX-512)
    multiply with VPMADDUBSW, whose 16-bit sums saturate with full-range weights. The bundle is built once and run on
    whatever CPU the user has, so it must not depend on the exporting host's flags: measured on an AVX2-only host, the
    tiny preset's int8 graph gave a min per-token cosine of 0.969 with 8-bit weights.
    fuse_attention: quantize the graph with each tower layer's attention as one onnxruntime operator and its Q, K, V
    projections as one matmul (export.onnx.attention; measured faster on CPUs, benchmarks/RESULTS.md). The int8 graph
    is for onnxruntime only, so it may hold onnxruntime's contrib operators.
    attention: which of the tower's activation-activation matmuls to quantize as well, "scores" (Q K^T) and/or
    "values" (softmax @ V), on the unfused graph (benchmark candidates; measured: no gain, benchmarks/RESULTS.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if attention and fuse_attention:
        raise ValueError("quantizing the attention matmuls needs the unfused graph: pass fuse_attention=False")
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".fused-") as tmp:
        source = Path(fp32_path)
        if fuse_attention:
            from export.onnx.attention import write_rewritten

            fused = Path(tmp) / source.name
            if write_rewritten(source, fused):
                source = fused
        big = sum(p.stat().st_size for p in _onnx_files(source)) > (1 << 31) - (64 << 20)  # protobuf's 2 GiB limit
        quantize_dynamic(source, out_path, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                         nodes_to_quantize=int8_nodes(source, attention), use_external_data_format=big,
                         extra_options={"MatMulConstBOnly": False})  # the attention matmuls chosen have no constant side


def int8_nodes(fp32_path: Path, attention: Sequence[str] = ()) -> list[str]:
    """Names of the nodes an int8 graph quantizes: the ops quantize_dynamic takes by default when they read a weight
    (MatMul, the patch Conv, the position-embedding Gather, a packed com.microsoft.Attention from
    export.onnx.attention), the attention matmuls named in `attention`, none of the prototype clustering (only its
    output MLP)."""
    import onnx

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    softmax = {out for node in graph.node if node.op_type == "Softmax" for out in node.output}
    nodes = []
    for node in graph.node:
        if _in_scope(node, _KEEP_FP32_IN_INT8) and not _in_scope(node, _QUANTIZE_IN_INT8):
            continue
        if (node.op_type == "Conv" or (node.op_type == "MatMul" and node.input[1] in weights)
                or (node.op_type == "Gather" and node.input[0] in weights)
                or (node.op_type == "Attention" and node.domain == "com.microsoft")):  # -> QAttention
            nodes.append(node.name)
        elif node.op_type == "MatMul" and any(s.startswith("scaled_dot_product_attention") for s in _scopes(node)):
            if ("values" if node.input[0] in softmax else "scores") in attention:
                nodes.append(node.name)
    return nodes


def _in_scope(node, scope: str) -> bool:
    """Whether an exported node came from module `scope` (the dynamo exporter's name_scopes metadata)."""
    return scope in _scopes(node)


def _scopes(node) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(prop.value)
    return []


def _validation_inputs(image_size: int) -> list[np.ndarray]:
    """Seeded N(0, 1) pixel batches (the range of CLIP-normalised pixels), one per validation batch size."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((b, 3, image_size, image_size)).astype(np.float32) for b in VALIDATION_BATCHES]


def export_random_preset(preset: str, out: str | os.PathLike, precisions: Sequence[str] = PRECISIONS,
                         log: Callable[[str], None] = print) -> list[Artifact]:
    """Export the vision graph of a preset with random weights (benchmarks; no checkpoint, no LLM built)."""
    from types import SimpleNamespace

    from export import base_manifest, peak_rss_mib, step
    from sqllava_edge.bundle import shareable_mode, write_manifest
    from sqllava_edge.config import get_preset
    from sqllava_edge.fileutil import atomic_dir
    from sqllava_edge.model import VisionTower, build_projector

    config = get_preset(preset)
    torch.manual_seed(0)
    parts = SimpleNamespace(config=config, vision=VisionTower(config.vision).eval(), projector=build_projector(config).eval())
    with atomic_dir(out) as tmp, step(f"vision ONNX {', '.join(precisions)} of preset {preset} (random weights)", log) as stats:
        os.chmod(tmp, shareable_mode(0o777))
        artifacts = export_vision_onnx(parts, tmp, precisions, log=log)
        llm = config.llm
        manifest = base_manifest(config, {"bos": llm.bos_token_id, "eos": llm.eos_token_id, "pad": llm.pad_token_id,
                                          "unk": llm.pad_token_id}, {"source_checkpoint": f"random weights, preset {preset}"})
        for artifact in artifacts:
            manifest.add(artifact)
        write_manifest(tmp, manifest)
    for artifact in artifacts:
        v = artifact.validation
        log(f"[onnx] {artifact.precision}: max_abs_diff {v['max_abs_diff']:.3g}, per-token cosine min {v['cosine_min']:.6f} "
            f"mean {v['cosine_mean']:.6f}")
    log(f"[onnx] total {stats['seconds']:.1f} s, peak RSS {peak_rss_mib():.0f} MiB")
    return artifacts
