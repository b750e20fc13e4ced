"""The decode roofline: tokens/s <= memory bandwidth / bytes of weights read per token (edge-deployment.md 6).

Each decoded token reads every weight matrix once (all layers and the output head) but only one row of the token
embedding table. The KV cache read at the measured context length is reported beside it; it is not part of the
weights-only roofline the targets use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from sqllava_edge.config import LLMConfig

EMBEDDING_TENSOR = "token_embd.weight"  # GGUF name of the input embedding table


def gguf_bytes_per_token(path: str | os.PathLike, vocab_size: int) -> dict[str, Any]:
    """Weight bytes a decode step reads from a GGUF file (tensor data sizes from its header)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = embedding = 0
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        total += int(tensor.n_bytes)
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + int(tensor.n_bytes)
        if tensor.name == EMBEDDING_TENSOR:
            embedding = int(tensor.n_bytes)
    if total == 0:
        raise ValueError(f"{path} holds no tensors; it is not a model GGUF")
    per_token = total - embedding + embedding // max(1, vocab_size)  # spec: one embedding row per token
    return {"weights_bytes": total, "embedding_bytes": embedding, "bytes_per_token": per_token,
            "bytes_by_type": types, "source": "GGUF tensor sizes"}


def torch_bytes_per_token(llm) -> dict[str, Any]:
    """The same for a transformers LlamaForCausalLM in its current dtype."""
    total = sum(p.numel() * p.element_size() for p in llm.parameters())
    table = llm.get_input_embeddings().weight
    embedding = table.numel() * table.element_size()
    per_token = total - embedding + embedding // table.shape[0]
    return {"weights_bytes": total, "embedding_bytes": embedding, "bytes_per_token": per_token,
            "source": f"torch parameters ({str(table.dtype).removeprefix('torch.')})"}


def kv_read_bytes(llm: LLMConfig, context: int, bytes_per_value: int = 2) -> int:
    """K and V read by one decode step at `context` positions: 2 * layers * context * kv_heads * head_dim * bytes."""
    return 2 * llm.num_layers * context * llm.num_kv_heads * llm.head_dim * bytes_per_value


def roofline(bandwidth_gbps: float, bytes_per_token: int) -> float:
    """Upper bound on decode tokens/s (edge-deployment.md 6: bandwidth / bytes of weights read per token)."""
    return bandwidth_gbps * 1e9 / bytes_per_token


# --------------------------------------------------------------------------------------------------------------------
# Compute limits: peak fp32 / bf16 / int8 rates from cores x clock x SIMD width, and the work of each measured figure


@dataclass(frozen=True)
class CoreModel:
    """What one core can issue per cycle. A vector instruction wider than the datapath runs in datapath-wide parts."""
    name: str
    datapath_bits: int  # width of the vector execution units
    fma_pipes: int  # fp32 FMA instructions per cycle, each datapath_bits wide
    dot_pipes: int  # int8 (VNNI) and bf16 dot-product instructions per cycle, each datapath_bits wide
    basis: str

    def peaks(self, cores: int, ghz: float) -> dict[str, float]:
        """-> {"fp32_gflops", "bf16_gflops", "int8_gops"}: 2 operations per multiply-add."""
        cycles = cores * ghz  # G cycles / s
        return {"fp32_gflops": cycles * self.fma_pipes * (self.datapath_bits // 32) * 2,
                "bf16_gflops": cycles * self.dot_pipes * (self.datapath_bits // 16) * 2,  # vdpbf16ps: 2 MACs per lane
                "int8_gops": cycles * self.dot_pipes * (self.datapath_bits // 8) * 2}  # vpdpbusd: 4 MACs per lane


# AVX-512 x86 cores (the machine type measured: AVX-512 VNNI + BF16, no AMX).
CORE_MODELS = {
    "zen4": CoreModel("AMD Zen 4 (256-bit datapath)", 256, 2, 2,
                      "AMD family 25 with AVX-512: 512-bit instructions run as two 256-bit halves on the two FMA pipes; "
                      "VNNI and BF16 dot products on the same two pipes"),
    "zen5": CoreModel("AMD Zen 5 server (512-bit datapath)", 512, 2, 2,
                      "AMD family 26 (EPYC): two 512-bit FMA pipes; the CPU flags avx_vnni and avx512_vp2intersect, "
                      "which Zen 4 lacks, appear with it"),
}


def core_model_for(machine: dict) -> tuple[str | None, str]:
    """(key of CORE_MODELS or None, why) from a kept run's machine fingerprint."""
    family, vendor, simd = machine.get("family"), machine.get("vendor"), machine.get("simd") or []
    if vendor == "AuthenticAMD" and family == 25 and "avx512f" in simd:
        return "zen4", "family 25 with AVX-512"
    if vendor == "AuthenticAMD" and family == 26:
        return "zen5", "family 26"
    if family is None and "avx_vnni" in simd and "avx512f" in simd and "AMD" in (machine.get("model_name") or ""):
        return "zen5", "family not recorded; its flags include avx_vnni with AVX-512, which no Zen 4 has"
    return None, "family not recorded" if family is None else f"no core model for family {family}"


def _linear_macs(tokens: int, d_in: int, d_out: int) -> int:
    return tokens * d_in * d_out


def vision_ops(config) -> dict[str, int]:
    """Operations (2 per multiply-add) of one image through the vision tower's layers used and the projector.
    -> {"tower", "projector", "total"}. Softmax, norms and activations are not counted (a few % at this size)."""
    v, p = config.vision, config.projector
    patches, d, i = v.num_patches, v.hidden_size, v.intermediate_size
    t = patches + 1  # CLS + patches through the tower
    tower = patches * 3 * v.patch_size ** 2 * d  # patch embedding
    tower += v.layers_used * (_linear_macs(t, d, 4 * d) + _linear_macs(t, d, 2 * i) + 2 * t * t * d)  # qkvo, MLP, QK^T + AV
    h, n, tokens = config.llm.hidden_size, p.num_centers, config.num_image_tokens
    if p.type == "cluster":  # PrototypeExtractor.forward: f, v; pooling; EM rounds; dispatch; MLP
        proj = 2 * tokens * d * d + 2 * n * tokens * d + p.em_iterations * (n * d * d + 2 * n * tokens * d)
        proj += 3 * n * tokens * d + tokens * d * h + tokens * h * h
    elif p.type == "mlp2x_gelu":
        proj = tokens * d * h + tokens * h * h
    else:
        proj = tokens * d * h if p.type == "linear" else 0
    return {"tower": 2 * tower, "projector": 2 * proj, "total": 2 * (tower + proj)}


def prefill_ops(llm: LLMConfig, positions: int) -> int:
    """Operations of a prefill of `positions` positions: every layer's projections and MLP at each position, causal
    attention (position j attends to j + 1 positions), and the output head for the last position only."""
    h, kv = llm.hidden_size, llm.num_kv_heads * llm.head_dim
    per_position = 2 * h * h + 2 * h * kv + 3 * h * llm.intermediate_size
    attention = 2 * h * positions * (positions + 1) // 2  # QK^T and AV
    return 2 * (llm.num_layers * (positions * per_position + attention) + h * llm.vocab_size)


def _clock_ghz(run: dict, runs: list[dict]) -> tuple[float | None, str]:
    mhz = run["machine"].get("mhz_reported")
    if mhz:
        return mhz / 1000, "reported"
    others = sorted(r["machine"]["mhz_reported"] for r in runs if r["machine"].get("mhz_reported"))
    if others:
        return others[len(others) // 2] / 1000, "not recorded: the other runs' reported clock"
    return None, "not recorded"


def figure_limits(run: dict, runs: list[dict]) -> list[dict[str, Any]]:
    """Each figure of a kept run against the peak of each core model: [{"figure", "measured", "work", "rate",
    "unit", "shares": {model: achieved / peak}}]. A share above 1 means the model (or the clock) cannot be right."""
    from benchmarks.workload import Workload
    from sqllava_edge.config import get_preset

    config = get_preset(run["preset"])
    cores, (ghz, _) = run["machine"].get("logical_cpus"), _clock_ghz(run, runs)
    if not cores or not ghz:
        return []
    peaks = {key: model.peaks(cores, ghz) for key, model in CORE_MODELS.items()}
    f = run["figures"]
    positions = f.get("prefill_positions") or config.num_image_tokens + Workload().prompt_tokens
    vision, prefill = vision_ops(config)["total"], prefill_ops(config.llm, positions)
    rows = []

    def add(name, measured, unit, seconds, work, peak_key):
        if measured is None:
            return
        rate = work / seconds / 1e9
        rows.append({"figure": name, "measured": measured, "unit": unit, "work_g": work / 1e9, "rate": rate,
                     "rate_unit": "GOP/s" if peak_key == "int8_gops" else "GFLOP/s", "peak": peak_key,
                     "shares": {key: rate / p[peak_key] for key, p in peaks.items()}})

    vis = f.get("vision_ms") or {}
    for label, key, peak_key in (("vision, PyTorch eager fp32", "eager_fp32", "fp32_gflops"),
                                 ("vision, onnxruntime fp32", "onnxruntime:fp32", "fp32_gflops"),
                                 ("vision, onnxruntime int8", "onnxruntime:int8", "int8_gops")):
        ms = vis.get(key)
        add(label, ms, "ms", (ms or 1) / 1000, vision, peak_key)
    for label, key, peak_key in (("prefill, llama.cpp q4_k_m (4-bit x int8 dot products)", "row", "int8_gops"),
                                 ("prefill, PyTorch eager fp32", "eager_fp32", "fp32_gflops")):
        tok_s = (f.get("prefill_tok_s") or {}).get(key)
        add(f"{label}, {positions} positions", tok_s, "tok/s", positions / (tok_s or 1), prefill, peak_key)
    ttft = (f.get("ttft_ms") or {}).get("row")
    if ttft is not None:  # vision + prefill at the int8 peak: the least time the first token can take
        add(f"time to first token (vision + prefill as int8)", ttft, "ms", ttft / 1000, vision + prefill, "int8_gops")
    decode, per_token = (f.get("decode_tok_s") or {}).get("row"), f.get("decode_bytes_per_token")
    bandwidth = run["machine"].get("bandwidth_gbps")
    if decode is not None and per_token and bandwidth:
        share = decode * per_token / 1e9 / bandwidth
        rows.append({"figure": "decode (weights read per token / measured bandwidth)", "measured": decode,
                     "unit": "tok/s", "work_g": per_token / 1e9, "rate": decode * per_token / 1e9, "rate_unit": "GB/s",
                     "peak": "bandwidth", "shares": {key: share for key in CORE_MODELS}})
    return rows


def render_limits(runs: list[dict], markdown: bool = False) -> str:
    """The machine type's limits and every kept run's figures against them (python -m benchmarks.ranges --limits)."""
    from benchmarks.machine import machine_label

    lines = []
    for run in runs:
        if not run.get("counted"):
            continue
        m = run["machine"]
        ghz, how = _clock_ghz(run, runs)
        known, why = core_model_for(m)
        cores = m.get("logical_cpus")
        if not cores or not ghz:
            lines += [f"{machine_label(run)}: cores or clock not recorded: no limits", ""]
            continue
        bandwidth = m.get("bandwidth_gbps")
        lines.append(f"{'**' if markdown else ''}{machine_label(run)}{'**' if markdown else ''}: {cores} cores x "
                     f"{ghz:.3f} GHz ({how}; a VM shows the nominal clock, not boost); memory bandwidth "
                     + (f"{bandwidth:.1f} GB/s measured in the run" if bandwidth else "not recorded") + "; core model "
                     + (f"{CORE_MODELS[known].name} ({why})" if known else f"unknown ({why}): both shown"))
        for key, model in CORE_MODELS.items():
            p = model.peaks(cores, ghz)
            lines.append(f"{'- ' if markdown else '  '}if {model.name}: fp32 {p['fp32_gflops']:.0f} GFLOP/s, bf16 "
                         f"{p['bf16_gflops']:.0f} GFLOP/s, int8 {p['int8_gops']:.0f} GOP/s")
        lines.append("")
        header = ["figure", "measured", "work", "achieved"] + [f"share of {CORE_MODELS[k].name} peak" for k in CORE_MODELS]
        if markdown:
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in figure_limits(run, runs):
            cells = [row["figure"], f"{row['measured']:,.0f} {row['unit']}",
                     f"{row['work_g']:,.2f} {'GB' if row['peak'] == 'bandwidth' else 'G ops'}",
                     f"{row['rate']:,.0f} {row['rate_unit']}"]
            for key in CORE_MODELS:
                share = row["shares"][key]
                mark = " (above peak: not this core model at this clock)" if share > 1 else ""
                cells.append(f"{share:.0%}{mark}" + (" <-" if key == known and not markdown else ""))
            lines.append("| " + " | ".join(cells) + " |" if markdown else "  " + "; ".join(cells))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
