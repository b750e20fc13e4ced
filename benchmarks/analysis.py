"""Raw results -> figures (medians and spread of every measurement) and the benchmark's target ratios.

Every ratio compares numbers measured in the same run. The headline combination is the one with the lowest median
end-to-end time; the ratios that concern one combination (roofline share, follow-up TTFT, self_question) use it.
"""
from __future__ import annotations

from typing import Any

from benchmarks.roofline import roofline
from benchmarks.timing import percentile, summarize

# (id, what, comparison, target). A target not met is reported as measured.
# ttft_ratio, e2e_speedup and auto_is_fastest concern the automatic measured choice when it was measured (what a
# user gets by default), else the fastest end-to-end combination.
TARGETS = (
    ("vision_speedup", "best CPU vision backend vs PyTorch eager fp32 (batch 1, cosine >= 0.99)", ">=", 3.0),
    ("vision_fp32_speedup", "onnxruntime fp32 vision vs PyTorch eager fp32 (batch 1)", ">=", 1.0),
    ("llamacpp_vs_high_level", "our llama.cpp decode vs llama-cpp-python high-level API, same GGUF", ">=", 0.95),
    ("roofline_share", "decode tokens/s as a share of the bandwidth roofline", ">=", 0.60),
    ("ttft_ratio", "time to first token (image + question) / the PyTorch eager fp32 pipeline's", "<=", 0.5),
    ("e2e_speedup", "end-to-end vs the PyTorch eager fp32 pipeline", ">=", 2.5),
    ("auto_is_fastest", "automatic measured choice's TTFT / the fastest measured combination's TTFT (5% = run "
                        "noise)", "<=", 1.05),
    ("followup_ttft_ratio", "cached follow-up question TTFT / first question TTFT", "<=", 0.10),
    ("self_question_speedup", "self_question(n) sequential / shared-prefix time", ">=", 1.8),
)
MIN_COSINE = 0.99
NOT_MEASURED_SHARED = "not measured: machine shared"


def _values(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs if r.get(key) is not None]


def _median(summary: dict | None) -> float | None:
    return None if summary is None else summary["median"]


def pipeline_figures(runs: list[dict]) -> dict[str, Any]:
    """Summaries of the pipeline runs' samples (shared by our combinations and the eager baseline)."""
    itl = [x for r in runs for x in r["itl_ms"]]
    prefill_tok_s = [r["prefill_positions"] / (r["prefill_ms"] / 1000) for r in runs]
    figures = {key: summarize(_values(runs, key)) for key in
               ("preprocess_ms", "encode_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "e2e_ms", "followup_ttft_ms")}
    figures.update(prefill_tok_s=summarize(prefill_tok_s), itl_p50_ms=percentile(itl, 50), itl_p95_ms=percentile(itl, 95),
                   itl_samples=len(itl), prefill_positions=runs[0]["prefill_positions"] if runs else None)
    return figures


def _batch_figures(job: dict) -> dict[str, Any]:
    timed = job["vision_batch"]["timed"]
    return {"encode_batch_ms": summarize(_values(timed, "ms")), "encode_batch_per_image_ms": summarize(_values(timed, "per_image_ms"))}


def bandwidth_gbps(results: dict) -> float:
    """The strictest (highest) bandwidth measured in the run, start or end."""
    return max(results["bandwidth"][when]["gbps"] for when in ("start", "end") if when in results["bandwidth"])


def _roofline_for(label: str, results: dict, eager: dict | None) -> dict | None:
    info = results.get("roofline_bytes", {}).get(label)
    if info is None and label == "torch" and eager is not None:
        info = eager.get("roofline_bytes")
    if info is None:
        return None
    return {"bytes_per_token": info["bytes_per_token"], "tok_s": roofline(bandwidth_gbps(results), info["bytes_per_token"])}


def combo_figures(job: dict, results: dict, eager: dict | None) -> dict[str, Any]:
    figures = pipeline_figures(job["pipeline"]["timed"])
    figures.update(_batch_figures(job))
    sq = job["self_question"]
    figures["self_question_shared_ms"] = summarize(_values(sq["shared"]["timed"], "ms"))
    figures["self_question_sequential_ms"] = summarize(_values(sq["sequential"]["timed"], "ms"))
    figures["cosine_vs_eager_fp32"] = job.get("cosine_vs_eager_fp32")
    figures["memory"] = job["memory"]
    llm_label = job["llm"]["kind"] if job["llm"]["kind"] == "torch" else f"{job['llm']['kind']}:{job['llm']['precision']}"
    roof = _roofline_for(llm_label, results, eager)
    if roof is not None and figures["decode_tok_s"] is not None:
        roof["share"] = figures["decode_tok_s"]["median"] / roof["tok_s"]
    figures["roofline"] = roof
    figures["assistant"] = assistant_figures(job.get("assistant"))
    return figures


def assistant_figures(api: dict | None) -> dict[str, Any] | None:
    """Summaries of the runs through the public API (token counts vary: EOS from random weights is honoured)."""
    if not api:
        return None
    chat, sq = api["chat"]["timed"], api["self_question"]["timed"]
    keys = ("ttft_ms", "e2e_ms", "answer_tokens", "followup_ttft_ms", "followup_prefill_tokens",
            "followup_vision_encodes", "first_prefill_positions")
    return {**{key: summarize(_values(chat, key)) for key in keys},
            "self_question_ms": summarize(_values(sq, "ms")), "self_question_tokens": summarize(_values(sq, "decode_tokens"))}


def vision_label(job: dict) -> str:
    """The vision row a combination or vision-only job measures, e.g. "onnxruntime:int8"."""
    return f"{job['vision']['kind']}:{job['vision']['precision']}"


FP32_ONNX_ROW = "onnxruntime:fp32"


def vision_rows(results: dict, eager: dict | None) -> list[dict[str, Any]]:
    """One row per vision backend measured (in a combination or alone), plus the eager baseline's vision."""
    rows, seen = [], set()
    for job in results["jobs"]:
        if job.get("error") or job["kind"] not in ("combo", "vision"):
            continue
        label = vision_label(job)
        if label in seen:
            continue
        seen.add(label)
        single = job["pipeline"]["timed"] if job["kind"] == "combo" else job["single"]["timed"]
        rows.append({"label": label, "description": job["vision"]["description"], "gpu": "tensorrt" in label or
                     "CUDA" in job["vision"]["description"] or "Tensorrt" in job["vision"]["description"],
                     "preprocess_ms": summarize(_values(single, "preprocess_ms")),
                     "encode_ms": summarize(_values(single, "encode_ms")), **_batch_figures(job),
                     "cosine": job.get("cosine_vs_eager_fp32")})
    base = _median(eager["figures"]["encode_ms"]) if eager else None
    for row in rows:
        row["speedup_vs_eager"] = base / row["encode_ms"]["median"] if base and row["encode_ms"] else None
    return rows


def _target(tid: str, measured: float | None, detail: str) -> dict[str, Any]:
    _, what, op, goal = next(t for t in TARGETS if t[0] == tid)
    met = None if measured is None else (measured >= goal if op == ">=" else measured <= goal)
    return {"id": tid, "what": what, "target": f"{op} {goal:g}", "measured": measured, "met": met, "detail": detail}


def _vision_target(rows: list[dict], eager: dict | None) -> dict:
    cpu = [r for r in rows if not r["gpu"] and r["speedup_vs_eager"] is not None and r["cosine"]
           and r["cosine"]["min"] >= MIN_COSINE]
    if not cpu or eager is None:
        return _target("vision_speedup", None, "needs the eager baseline (--checkpoint) and a CPU vision backend "
                                               f"with per-token cosine >= {MIN_COSINE}")
    best = max(cpu, key=lambda r: r["speedup_vs_eager"])
    return _target("vision_speedup", best["speedup_vs_eager"],
                   f"{best['label']}: {best['encode_ms']['median']:.0f} ms vs eager {_median(eager['figures']['encode_ms']):.0f} ms "
                   f"per image, per-token cosine min {best['cosine']['min']:.4f} / mean {best['cosine']['mean']:.4f}")


def _vision_fp32_target(rows: list[dict], eager: dict | None) -> dict:
    row = next((r for r in rows if r["label"] == FP32_ONNX_ROW and r["speedup_vs_eager"] is not None), None)
    if row is None or eager is None:
        return _target("vision_fp32_speedup", None, "needs the eager baseline (--checkpoint) and the bundle's fp32 "
                                                    "vision ONNX on onnxruntime")
    return _target("vision_fp32_speedup", row["speedup_vs_eager"],
                   f"{row['encode_ms']['median']:.0f} ms vs eager {_median(eager['figures']['encode_ms']):.0f} ms per image")


def _auto_target(auto: dict | None, combos: list[dict]) -> dict:
    if auto is None:
        return _target("auto_is_fastest", None, "the automatic measured choice was not measured (--no-tune, "
                                                "$SQLLAVA_EDGE_TUNE=0, a GPU run, or the tuning failed: see Notes)")
    fastest = min(combos, key=lambda c: _median(c["figures"]["ttft_ms"]))
    ttft = {c["label"]: _median(c["figures"]["ttft_ms"]) for c in combos}
    others = ", ".join(f"{label} {value:.0f} ms" for label, value in ttft.items() if label != auto["label"])
    return _target("auto_is_fastest", ttft[auto["label"]] / ttft[fastest["label"]],
                   f"{auto['label']}: TTFT {ttft[auto['label']]:.0f} ms; fastest {fastest['label']}; others: {others}")


def targets(results: dict, combos: list[dict], rows: list[dict], eager: dict | None, overhead: dict | None) -> list[dict]:
    out = [_vision_target(rows, eager), _vision_fp32_target(rows, eager)]
    if overhead is not None:
        ours, raw = overhead["ours"]["decode_tok_s"]["median"], overhead["high_level"]["decode_tok_s"]["median"]
        out.append(_target("llamacpp_vs_high_level", ours / raw, f"{ours:.2f} vs {raw:.2f} tok/s at context "
                                                                 f"{overhead['prompt_positions']}"))
    else:
        out.append(_target("llamacpp_vs_high_level", None, "no llama.cpp combination measured"))
    head = min(combos, key=lambda c: c["figures"]["e2e_ms"]["median"]) if combos else None
    if head is None:
        done = {t["id"] for t in out}
        return out + [_target(t[0], None, "no combination measured") for t in TARGETS if t[0] not in done]
    f, name = head["figures"], head["label"]
    auto = next((c for c in combos if c.get("tuned")), None)
    user = auto or head  # what the latency targets judge
    roof = f["roofline"]
    out.append(_target("roofline_share", roof and roof.get("share"),
                       f"{name}: {_median(f['decode_tok_s']):.2f} tok/s vs roofline {roof['tok_s']:.2f} tok/s "
                       f"({bandwidth_gbps(results):.1f} GB/s / {roof['bytes_per_token'] / 1e6:.0f} MB per token)" if roof else "no roofline"))
    uf, uname = user["figures"], user["label"]
    if eager is not None:
        ef = eager["figures"]
        out.append(_target("ttft_ratio", _median(uf["ttft_ms"]) / _median(ef["ttft_ms"]),
                           f"{uname}: {_median(uf['ttft_ms']):.0f} ms vs eager {_median(ef['ttft_ms']):.0f} ms"))
        out.append(_target("e2e_speedup", _median(ef["e2e_ms"]) / _median(uf["e2e_ms"]),
                           f"{uname}: {_median(uf['e2e_ms']):.0f} ms vs eager {_median(ef['e2e_ms']):.0f} ms"))
    else:
        out += [_target(tid, None, "needs the eager baseline (--checkpoint)") for tid in ("ttft_ratio", "e2e_speedup")]
    out.append(_auto_target(auto, combos))
    backend = (f"backend level (fixed tokens): {_median(f['followup_ttft_ms']):.0f} ms vs {_median(f['ttft_ms']):.0f} ms "
               f"= {_median(f['followup_ttft_ms']) / _median(f['ttft_ms']):.3f}")
    api = f.get("assistant")
    if api:
        out.append(_target("followup_ttft_ratio", _median(api["followup_ttft_ms"]) / _median(api["ttft_ms"]),
                           f"{name}, Assistant.chat: {_median(api['followup_ttft_ms']):.0f} ms (prefills "
                           f"{_median(api['followup_prefill_tokens']):.0f} new tokens, "
                           f"{_median(api['followup_vision_encodes']):.0f} vision encodes) vs {_median(api['ttft_ms']):.0f} ms "
                           f"for the first question on a new image; {backend}"))
    else:
        out.append(_target("followup_ttft_ratio", _median(f["followup_ttft_ms"]) / _median(f["ttft_ms"]), f"{name}: {backend}"))
    shared, seq = _median(f["self_question_shared_ms"]), _median(f["self_question_sequential_ms"])
    out.append(_target("self_question_speedup", seq / shared, f"{name}: {seq:.0f} ms sequential vs {shared:.0f} ms shared"))
    return out


def analyze(results: dict) -> dict[str, Any]:
    """-> {"eager", "overhead", "combos", "vision", "targets", "errors"}: the figures every report is drawn from."""
    eager = overhead = None
    combos, errors = [], []
    probe = None
    for job in results["jobs"]:
        if job["kind"] == "high_level_defaults":
            probe = {"ok": not job.get("error"), "detail": job.get("error") or f"ran ({job['eval_ms']:.0f} ms for 8 tokens)"}
        elif job.get("error"):
            errors.append(f"{job['label']}: {job['error']}")
        elif job["kind"] == "eager":
            eager = {**job, "figures": eager_figures(job, results)}
        elif job["kind"] == "llamacpp_overhead":
            overhead = {side: pipeline_side(job["runs"][side]["timed"]) for side in ("ours", "high_level")}
            overhead["prompt_positions"] = job["prompt_positions"]
            overhead["descriptions"] = {"ours": job["ours_description"], "high_level": job["high_level_description"]}
    for job in results["jobs"]:
        if job["kind"] == "combo" and not job.get("error"):
            combos.append({"label": job["label"], "vision": job["vision"], "llm": job["llm"], "tuned": job.get("tuned", False),
                           "figures": combo_figures(job, results, eager)})
    rows = vision_rows(results, eager)
    judged, contention = with_contention(targets(results, combos, rows, eager, overhead),
                                         results["jobs"] + bandwidth_jobs(results), combos)
    profiles = {("PyTorch eager fp32" if j["kind"] == "eager" else f"{j['vision']['kind']}:{j['vision']['precision']}"):
                j["profile"] for j in results["jobs"] if not j.get("error") and j.get("profile")}
    return {"eager": eager and {k: eager[k] for k in ("label", "description", "figures", "memory", "load_ms",
                                                        "preprocess_parity_max_abs_diff", "roofline_bytes")
                          if k in eager},
            "overhead": overhead, "high_level_defaults": probe, "combos": combos, "vision_profiles": profiles, "vision": rows, "errors": errors,
            "targets": judged, "contention": contention, "bandwidth_gbps": bandwidth_gbps(results)}


BANDWIDTH = "memory bandwidth"


def bandwidth_jobs(results: dict) -> list[dict]:
    """The bandwidth measurements as one pseudo-job for the contention check: shared if either (start, end) was."""
    records = [m["contention"] for m in results.get("bandwidth", {}).values() if isinstance(m, dict) and m.get("contention")]
    if not records:
        return []
    verdicts = [r.get("contended") for r in records]
    merged = next((r for r in records if r.get("contended")), records[0])
    return [{"kind": "bandwidth", "label": BANDWIDTH,
             "contention": {**merged, "contended": True if any(verdicts) else (None if None in verdicts else False)}}]


def target_sources(tid: str, jobs: list[dict], combos: list[dict]) -> list[str]:
    """Labels of the jobs whose numbers a target is computed from (a choice among rows depends on every row)."""
    ok = [j for j in jobs if not j.get("error")]
    eager = [j["label"] for j in ok if j["kind"] == "eager"]
    combo_labels = [c["label"] for c in combos]
    auto = [c["label"] for c in combos if c.get("tuned")]
    if tid == "vision_speedup":
        return eager + [j["label"] for j in ok if j["kind"] in ("combo", "vision")]
    if tid == "vision_fp32_speedup":
        return eager + [j["label"] for j in ok if j["kind"] in ("combo", "vision") and vision_label(j) == FP32_ONNX_ROW]
    if tid == "llamacpp_vs_high_level":
        return [j["label"] for j in ok if j["kind"] == "llamacpp_overhead"]
    if tid in ("ttft_ratio", "e2e_speedup"):
        return eager + (auto or combo_labels)
    if tid == "roofline_share":  # decode tok/s over the bandwidth measured in the run
        return combo_labels + [j["label"] for j in ok if j["kind"] == "bandwidth"]
    return combo_labels  # auto_is_fastest, follow-up, self_question: the headline is chosen among the combos


def with_contention(found: list[dict], jobs: list[dict], combos: list[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Each target gets its sources and a status: "met", "not met", "not measured" (nothing to compare) or
    NOT_MEASURED_SHARED when a job it is computed from was still contended after its retries: then `met` is None
    (never True), the ratio stays as `measured` for the record, and `evidence` says what the job saw.
    -> (targets, {"checked", "shared_jobs", "counted"}): the run counts (True) when every job a target is computed
    from was checked and quiet; False when one was shared; None when contention was not checked (an older record,
    or no /proc/stat)."""
    from benchmarks.contention import describe

    records = {j["label"]: j.get("contention") for j in jobs if not j.get("error")}
    shared = {label: r for label, r in records.items() if r and r.get("contended")}
    out = []
    for t in found:
        t = {**t, "sources": target_sources(t["id"], jobs, combos)}
        hit = [label for label in t["sources"] if label in shared]
        if hit:
            t.update(met=None, status=NOT_MEASURED_SHARED,
                     evidence="; ".join(f"{label}: {'; '.join(shared[label]['reasons'])} ({describe(shared[label])})"
                                        for label in hit))
        else:
            t["status"] = "not measured" if t["met"] is None else ("met" if t["met"] else "not met")
        out.append(t)
    used = {label for t in out for label in t["sources"]}
    checked = bool(used) and all((records.get(label) or {}).get("contended") is not None for label in used)
    shared_used = sorted(used & set(shared))
    summary = {"checked": checked, "shared_jobs": sorted(shared),
               "counted": False if shared_used else (True if checked else None)}
    return out, summary


def eager_figures(job: dict, results: dict) -> dict[str, Any]:
    figures = {**pipeline_figures(job["pipeline"]["timed"]), **_batch_figures(job), "memory": job["memory"]}
    info = job["roofline_bytes"]
    roof = {"bytes_per_token": info["bytes_per_token"], "tok_s": roofline(bandwidth_gbps(results), info["bytes_per_token"])}
    if figures["decode_tok_s"] is not None:
        roof["share"] = figures["decode_tok_s"]["median"] / roof["tok_s"]
    figures["roofline"] = roof
    return figures


def pipeline_side(runs: list[dict]) -> dict[str, Any]:
    itl = [x for r in runs for x in r["itl_ms"]]
    return {"prefill_ms": summarize(_values(runs, "prefill_ms")), "decode_tok_s": summarize(_values(runs, "decode_tok_s")),
            "itl_p50_ms": percentile(itl, 50), "itl_p95_ms": percentile(itl, 95)}
