"""Check an exported vision ONNX against the PyTorch module, taking the prototype extractor's hard dispatch into account.

Why not just compare outputs: docs/spec.md 1.4.2 step 4 sends each token to the centre with the highest sigmoid similarity
(an argmax). With random weights the soft-EM leaves the 256 centres almost identical, so the top two similarities of
many tokens differ by less than float32 rounding (median margin 2.4e-7 on bench-1b). PyTorch itself then dispatches
the same image differently at batch 1 and inside a batch of 3 (outputs differ by ~0.1), so no exporter could meet a
1e-4 tolerance on the raw output. The check is therefore done in two parts:

  1. dispatch: the graph's own ArgMax output (exposed in a temporary copy of the graph that shares the weights file)
     vs PyTorch's. For fp32, a token may only be dispatched differently where PyTorch's top-2 margin is a tie
     (< FP32_TIE_MARGIN); the counts and margins are reported for every precision.
  2. values: PyTorch recomputed with the graph's dispatch (the same discrete choices), compared with the tolerance
     of the precision: fp32 max |diff| <= 1e-4, int8 per-token cosine >= 0.99, fp16 reported (finite).
The raw (unforced) differences are reported as well. The temporary copy's image_embeds must equal the shipped
graph's, so the graph that was checked is the graph that ships.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sqllava_edge.errors import ExportValidationError

INPUT_NAME, OUTPUT_NAME = "pixel_values", "image_embeds"
FP32_MAX_ABS_DIFF = 1e-4
INT8_MIN_COSINE = 0.99
FP32_TIE_MARGIN = 1e-5  # sigmoid-similarity margin under which a float32 dispatch is a tie
PROBE_MATCH = 1e-5  # shipped graph vs its copy with the extra output: max |diff| of image_embeds


def prototype_reference(m, x: torch.Tensor, best: torch.Tensor | None = None):
    """PrototypeExtractor.forward (model.py, docs/spec.md 1.4.2) with an optional forced dispatch.

    -> (output (B, L, H), dispatch (B, L) long, top-2 similarity margin (B, L), runner-up centre (B, L)).
    With best=None it must equal the
    module's own forward; export_vision_onnx checks that, so a change in model.py cannot go unnoticed here.
    """
    pool = m.pool.to(x.dtype)  # (N, L)
    feats = m.f(x)  # (B, L, D)
    keys = F.normalize(m.v(x), dim=1)  # (B, L, D), over tokens
    centers, center_feats = pool @ x, pool @ feats  # (B, N, D)
    for _ in range(m.iterations):  # soft-EM, step 3
        query = F.normalize(m.c(centers), dim=-1)
        centers = torch.softmax(query @ keys.transpose(1, 2), dim=1) @ feats  # (B, N, D)
    cos = F.normalize(centers, dim=-1) @ F.normalize(x, dim=-1).transpose(1, 2)  # (B, N, L)
    sim = torch.sigmoid(m.sim_beta + m.sim_alpha * cos)  # step 4
    top2 = sim.topk(2, dim=1)  # values / indices (B, 2, L)
    chosen = sim.argmax(dim=1) if best is None else best  # (B, L)
    onehot = F.one_hot(chosen, m.num_centers).transpose(1, 2).to(x.dtype)  # (B, N, L)
    weight = (sim * onehot).sum(dim=1)  # (B, L): s_l
    agg = ((onehot * weight.unsqueeze(1)) @ feats + center_feats) / (onehot.sum(-1, keepdim=True) + 1.0)  # step 5
    out = x + weight.unsqueeze(-1) * (onehot.transpose(1, 2) @ agg)  # step 6, (B, L, D)
    return m.mlp(out), chosen, top2.values[:, 0] - top2.values[:, 1], top2.indices[:, 1]


class Reference:
    """The PyTorch fp32 side: tower features once per input, projector output with or without a forced dispatch."""

    def __init__(self, graph, inputs: list[np.ndarray]):
        from sqllava_edge.model import PrototypeExtractor

        self.graph = graph
        self.cluster = isinstance(graph.projector, PrototypeExtractor)
        with torch.no_grad():
            self.feats = [graph.vision(torch.from_numpy(x)).float() for x in inputs]  # (B, T, D) each
            self.plain = [graph(torch.from_numpy(x)).numpy() for x in inputs]
            self.free = [self.run(i) for i in range(len(inputs))]
        for (out, _, _), plain in zip(self.free, self.plain):
            drift = float(np.abs(out - plain).max())
            if drift > 1e-6:
                raise ExportValidationError(f"export/onnx_validate.prototype_reference disagrees with model.py by {drift:.3g}; "
                                            "update it to the model's PrototypeExtractor.forward")

    @torch.no_grad()
    def run(self, i: int, best: np.ndarray | None = None):
        """-> (output (B, T, H), dispatch (B, T) or None, margin (B, T) or None) as numpy."""
        if not self.cluster:
            return self.graph.projector(self.feats[i]).float().numpy(), None, None
        forced = None if best is None else torch.from_numpy(best).long()
        out, chosen, margin, _ = prototype_reference(self.graph.projector, self.feats[i], forced)
        return out.numpy(), chosen.numpy(), margin.numpy()


def validate_vision_onnx(path: Path, precision: str, inputs: list[np.ndarray], reference: Reference) -> dict:
    """Run the graph in onnxruntime (CPU) on each input, compare as the module docstring says; raise if off."""
    import onnxruntime as ort

    report: dict = {"reference": "PyTorch fp32 module", "inputs": "seeded N(0,1) pixel_values",
                    "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
                    "compared": "with the graph's own dispatch (docs/spec.md 1.4.2 step 4); raw differences as unforced_*"}
    shipped = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with _with_dispatch_output(path) as (probe_path, dispatch_name):
        probe = ort.InferenceSession(str(probe_path), providers=["CPUExecutionProvider"]) if dispatch_name else None
        for i, x in enumerate(inputs):
            out = shipped.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            dispatch = None
            if probe is not None:
                probe_out, dispatch = probe.run([OUTPUT_NAME, dispatch_name], {INPUT_NAME: x})
                if float(np.abs(probe_out - out).max()) > PROBE_MATCH:
                    raise ExportValidationError(f"{path.name}: the graph with its dispatch exposed computes a different "
                                                f"{OUTPUT_NAME} than the shipped graph; cannot validate it")
            report[f"batch_{x.shape[0]}"] = _compare(path.name, precision, x.shape[0], out, dispatch, reference, i)
    batches = [report[f"batch_{x.shape[0]}"] for x in inputs]
    tolerance = {"fp32": {"max_abs_diff": FP32_MAX_ABS_DIFF, "dispatch_mismatch_margin_below": FP32_TIE_MARGIN},
                 "int8": {"cosine_min": INT8_MIN_COSINE}, "fp16": "reported"}[precision]
    report.update(max_abs_diff=max(b["max_abs_diff"] for b in batches), cosine_min=min(b["cosine_min"] for b in batches),
                  cosine_mean=float(np.mean([b["cosine_mean"] for b in batches])),
                  dispatch_mismatches=sum(b.get("dispatch_mismatches", 0) for b in batches),
                  unforced_max_abs_diff=max(b["unforced_max_abs_diff"] for b in batches),
                  unforced_cosine_min=min(b["unforced_cosine_min"] for b in batches), tolerance=tolerance, passed=True)
    return report


def _compare(name: str, precision: str, batch: int, out: np.ndarray, dispatch, reference: Reference, i: int) -> dict:
    free_out, free_best, margin = reference.free[i]
    where = f"{name}: tensor {OUTPUT_NAME} at batch {batch}"
    if out.shape != free_out.shape:
        raise ExportValidationError(f"{where}: shape {out.shape}, PyTorch gives {free_out.shape}")
    if not np.isfinite(out).all():
        raise ExportValidationError(f"{where}: non-finite values (tolerance: all finite)")
    numbers: dict = {}
    ref = free_out
    if dispatch is not None:
        mismatch = dispatch != free_best  # (B, T)
        worst_margin = float(margin[mismatch].max()) if mismatch.any() else 0.0
        numbers.update(dispatch_mismatches=int(mismatch.sum()), tokens=int(mismatch.size),
                       max_mismatch_margin=worst_margin, median_margin=float(np.median(margin)))
        if precision == "fp32" and worst_margin >= FP32_TIE_MARGIN:
            raise ExportValidationError(f"{name}: tensor dispatch (ArgMax) at batch {batch} sends a token elsewhere than "
                                        f"PyTorch although its similarity margin {worst_margin:.3g} is no tie "
                                        f"(tolerance: mismatches only below {FP32_TIE_MARGIN:g})")
        ref = reference.run(i, dispatch)[0] if mismatch.any() else free_out
    max_abs, cos = float(np.abs(out.astype(np.float64) - ref).max()), _token_cosine(out, ref)
    free_cos = _token_cosine(out, free_out)
    numbers.update(max_abs_diff=max_abs, cosine_min=float(cos.min()), cosine_mean=float(cos.mean()),
                   unforced_max_abs_diff=float(np.abs(out.astype(np.float64) - free_out).max()),
                   unforced_cosine_min=float(free_cos.min()), unforced_cosine_mean=float(free_cos.mean()))
    if precision == "fp32" and max_abs > FP32_MAX_ABS_DIFF:
        raise ExportValidationError(f"{where}: max |onnx - pytorch| = {max_abs:.3g} exceeds the fp32 tolerance {FP32_MAX_ABS_DIFF:g}")
    if precision == "int8" and cos.min() < INT8_MIN_COSINE:
        raise ExportValidationError(f"{where}: min per-token cosine {cos.min():.4f} is below the int8 tolerance {INT8_MIN_COSINE}")
    return numbers


class _with_dispatch_output:
    """A temporary copy of the graph (beside it, sharing its .onnx.data) with the dispatch ArgMax as an extra output."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, None

    def __enter__(self):
        import onnx
        from onnx import TensorProto, helper

        model = onnx.load(str(self.path), load_external_data=False)
        argmax = [n for n in model.graph.node if n.op_type == "ArgMax"]
        if len(argmax) != 1:  # not the cluster projector: nothing to expose
            return self.path, None
        name = argmax[0].output[0]
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, None))
        fd, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".onnx", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        onnx.save(model, str(self.tmp))  # external-data locations are relative: the same weights file is used
        return self.tmp, name

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def _token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each image token's embedding (B, T, H) -> (B, T), in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    denom = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(denom, 1e-30)
