"""Figures -> a Markdown report, PNG charts and `results.json` (raw samples + machine + figures), written atomically.

    write_outputs(out_dir, results, analysis)   # out_dir/report.md, results.json, chart.png (+ quality.png: speed vs
                                                # quality of every pairing) appear together or not at all
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sqllava_edge.fileutil import atomic_dir, atomic_write


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _m(summary: dict | None, digits: int = 1) -> str:
    """median (min-max)"""
    if summary is None:
        return "-"
    if summary["n"] == 1:
        return _f(summary["median"], digits)
    return f"{_f(summary['median'], digits)} ({_f(summary['min'], digits)}-{_f(summary['max'], digits)})"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def machine_section(results: dict, analysis: dict) -> list[str]:
    m, bw = results["machine"], results["bandwidth"]
    cpu, mem = m["cpu"], m["memory"]
    lines = ["## Machine", "",
             f"- CPU: {cpu['model']} ({cpu['arch']}), {cpu['logical_cpus']} logical CPUs, {cpu['usable_cpus']} usable, "
             f"threads used {m['threads_used']}{', virtual machine' if cpu['hypervisor'] else ''}; caches L2 "
             f"{cpu['l2_cache']}, L3 {cpu['l3_cache']}; governor {cpu['governor'] or 'n/a'}",
             f"- SIMD: {' '.join(cpu['simd']) or 'none found'}",
             f"- Memory: {_f((mem['total_bytes'] or 0) / 2**30)} GiB total, {_f((mem['available_bytes'] or 0) / 2**30)} GiB "
             f"available at start",
             f"- Memory bandwidth (measured in this run, {bw['start']['threads']} threads, {bw['start']['array_mib']:.0f} MiB "
             f"arrays, GB/s best of {bw['start']['repeats']}): start copy {bw['start']['copy']['best_gbps']:.1f} / triad "
             f"{bw['start']['triad']['best_gbps']:.1f} / read {bw['start']['read']['best_gbps']:.1f}; end copy "
             f"{bw['end']['copy']['best_gbps']:.1f} / triad {bw['end']['triad']['best_gbps']:.1f} / read "
             f"{bw['end']['read']['best_gbps']:.1f}. Roofline uses the highest: {analysis['bandwidth_gbps']:.1f} GB/s",
             f"- Load average (1/5/15 min) at start {_load(m.get('load_average_at_start'))}, at end "
             f"{_load(m.get('load_average_at_end'))}"]
    gpu, jetson = m.get("gpu"), m.get("jetson")
    if gpu:
        for g in gpu["gpus"]:
            lines.append(f"- GPU: {g['name']}, driver {g['driver']}, CUDA {gpu['cuda_driver_version']}, "
                         f"{g['memory_mib']} MiB, compute {g['compute_capability']}, power limit {g['power_limit_w']} W")
    else:
        lines.append("- GPU: none")
    if jetson:
        lines.append(f"- Jetson: {jetson['model']}, L4T {jetson['l4t_release']}, JetPack {jetson['jetpack']}, "
                     f"power mode {(jetson['power_mode'] or 'unknown').splitlines()[0]}")
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v)
    lines += [f"- Software: {m['os']}; {libs}", ""]
    return lines


def _load(values) -> str:
    return "n/a" if not values else " / ".join(f"{v:.2f}" for v in values)


def contention_note(results: dict) -> list[str]:
    """Say which jobs ran on a shared machine (benchmarks.contention: other processes' share of the job's CPUs and
    steal over the job, the job's own CPU time beside them), with the evidence, and how many times each was retried."""
    from benchmarks.analysis import bandwidth_jobs
    from benchmarks.contention import describe

    jobs = [j for j in results["jobs"] if not j.get("error")] + bandwidth_jobs(results)
    checked = [j for j in jobs if (j.get("contention") or {}).get("contended") is not None]
    shared = [j for j in checked if j["contention"]["contended"]]
    retried = [j for j in jobs if j.get("discarded_attempts")]
    if not checked:
        return _legacy_contention_note(results) + ["> Contention was not checked for this run (no per-job /proc/stat "
                                                   "record): its targets are judged as measured.", ""]
    lines = []
    if shared:
        lines += [f"> **Machine shared: {len(shared)} of {len(checked)} jobs were measured while other processes or "
                  "the hypervisor took their CPUs, even after their retries. Every target computed from them is "
                  "reported as *not measured: machine shared*, never as met.**", ">"]
        lines += [f"> - {j['label']}: {'; '.join(j['contention']['reasons'])} ({describe(j['contention'])}; "
                  f"{1 + len(j.get('discarded_attempts', []))} attempt(s))" for j in shared]
        lines.append("")
    if retried:
        lines += ["Measured again because the machine was shared: " + ", ".join(
            f"{j['label']} ({len(j['discarded_attempts'])} discarded attempt(s): "
            + "; ".join(describe(a) for a in j["discarded_attempts"]) + ")" for j in retried), ""]
    quiet = [j for j in checked if not j["contention"]["contended"]]
    if quiet and not shared:
        lines += ["Every job ran on a quiet machine: " + "; ".join(f"{j['label']}: {describe(j['contention'])}"
                                                                   for j in quiet) + ".", ""]
    return lines


def _legacy_contention_note(results: dict) -> list[str]:
    """For a run recorded before the per-job check: the load average and each job's CPU time vs wall time."""
    m = results["machine"]
    cpus = m["cpu"]["usable_cpus"] or 1
    loads = [x for x in (m.get("load_average_at_start"), m.get("load_average_at_end")) if x]
    jobs = [j for j in results["jobs"] if j.get("process")]
    share = [j["process"]["cpu_seconds"] / (j["process"]["wall_seconds"] * m["threads_used"]) for j in jobs
             if j["process"]["wall_seconds"] > 0]
    busy = any(load[0] > cpus + 0.5 for load in loads)
    if not busy and not (share and min(share) < 0.6):
        return []
    detail = ", ".join(f"{j.get('label', j['kind'])} {100 * s:.0f}%" + _wait_text(j) for j, s in zip(jobs, share))
    detail = f"CPU time each job got, as a share of wall time x {m['threads_used']} threads: {detail}. " if detail else ""
    return [f"> **Shared machine:** the 1-minute load average was {' / '.join(f'{x[0]:.1f}' for x in loads)} (start / "
            f"end) on {cpus} CPUs. {detail}Times are slower than on an idle machine (llama.cpp's spinning threads suffer most when preempted); "
            "ratios between runs interleaved in one job are the most robust figures.", ""]


def _wait_text(job: dict) -> str:
    wait = job.get("idle_wait")
    return "" if not wait else f" (started at load {wait['load_at_start']:.1f} after waiting {wait['waited_s']:.0f} s)"


def targets_section(analysis: dict) -> list[str]:
    lines = ["## Targets (ratios measured in this run)", "", "| target | goal | measured | met | detail |",
             "|---|---|---|---|---|"]
    for t in analysis["targets"]:
        status = t.get("status")
        if status is None:  # an analysis from before statuses
            status = "n/a" if t["met"] is None else ("met" if t["met"] else "not met")
        met = {"met": "yes", "not met": "**no**", "not measured": "n/a"}.get(status, f"**{status}**")
        detail = t["detail"] + (f". Shared: {t['evidence']}" if t.get("evidence") else "")
        lines.append(f"| {t['what']} | {t['target']} | {_f(t['measured'], 3)} | {met} | {detail} |")
    return lines + [""]


def tuning_section(results: dict, analysis: dict) -> list[str]:
    """The tuning table the automatic choice came from, the choice, and how its first answer compares in this run."""
    tuning = results.get("tuning")
    if tuning is None:  # a results.json from before the benchmark went through tuning
        return []
    lines = ["## Automatic choice (measured selection, `runtimes.tune`)", ""]
    if not tuning.get("table"):
        why = tuning.get("skipped") or f"the tuning failed: {tuning.get('error')}"
        return lines + [f"Not measured: {why}.", ""]
    lines += [f"Tuning table: {tuning['how']}. Choice for prefer={tuning['prefer']}:", "",
              f"- vision: {tuning['vision_reason']}", f"- LLM: {tuning['llm_reason']}", "", "```text",
              tuning["text"], "```", ""]
    auto = next((c for c in analysis["combos"] if c.get("tuned")), None)
    if auto is None:
        return lines + ["The automatic choice was not measured end to end (see Notes).", ""]
    base = auto["figures"]["ttft_ms"]["median"]
    rows = [(c["label"], c["figures"]) for c in analysis["combos"]]
    if analysis["eager"]:
        rows.append(("PyTorch eager fp32 (baseline)", analysis["eager"]["figures"]))
    lines += [f"Loaded by `Assistant.load` with nothing given: LLM {auto['llm']['description']}; vision "
              f"{auto['vision']['description']}.", "",
              "| backends | TTFT ms | TTFT / automatic choice's | end-to-end ms |", "|---|---|---|---|"]
    for label, f in sorted(rows, key=lambda row: row[1]["ttft_ms"]["median"]):
        lines.append(f"| {label} | {_m(f['ttft_ms'], 0)} | {f['ttft_ms']['median'] / base:.2f} | {_m(f['e2e_ms'], 0)} |")
    return lines + [""]


def _quality_points(results: dict) -> list[dict]:
    """Pairings with both a first-answer estimate and a recorded KL (the speed-versus-quality chart's points)."""
    points = (results.get("tuning") or {}).get("quality_points") or []
    return [p for p in points if p["first_answer_s"] is not None and p["kl_mean"] is not None]


def quality_section(results: dict) -> list[str]:
    """Every vision x GGUF pairing: first-answer estimate (tuning) vs fidelity to fp32 PyTorch (export)."""
    points = (results.get("tuning") or {}).get("quality_points")
    if not points:
        return []
    lines = ["## Speed versus quality (every pairing of the bundle)", "",
             f"First answer: the tuning table's estimate. KL / top-1: the pairing's next-token distribution vs fp32 "
             f"PyTorch over the calibration answers, recorded at export (`sqllava-edge inspect`). Quality floor: "
             f"{results['tuning'].get('floor', '-')}. Chart: quality.png.", "",
             "| vision | LLM | first answer s | KL nats | top-1 | within floor | |", "|---|---|---|---|---|---|---|"]
    for p in sorted(points, key=lambda p: (p["first_answer_s"] is None, p["first_answer_s"] or 0.0)):
        top1 = "-" if p["top1_agreement"] is None else f"{p['top1_agreement']:.1%}"
        kl = "-" if p["kl_mean"] is None else f"{p['kl_mean']:.4f}"
        lines.append(f"| {p['vision']} | {p['llm']} | {_f(p['first_answer_s'], 3)} | {kl} | {top1} | "
                     f"{'yes' if p['within_floor'] else 'no'} | {'automatic choice' if p.get('automatic') else ''} |")
    return lines + [""]


def render_quality_chart(results: dict, path: Path) -> None:
    """First-answer latency vs KL to fp32, one point per pairing, the automatic choice marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = _quality_points(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p in points:
        auto = p.get("automatic")
        ax.scatter(p["first_answer_s"], p["kl_mean"], s=110 if auto else 45, marker="*" if auto else "o",
                   color="#c44e52" if auto else ("#4878a8" if p["within_floor"] else "#999999"), zorder=3)
        ax.annotate(f"{p['vision']} + {p['llm']}" + (" (automatic)" if auto else ""), (p["first_answer_s"], p["kl_mean"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("first answer, s (tuning estimate; lower is better)")
    ax.set_ylabel("KL to fp32 PyTorch, nats (lower is better)")
    if any(p["kl_mean"] > 0 for p in points):
        ax.set_yscale("symlog", linthresh=1e-4)
    ax.grid(alpha=0.3)
    ax.set_title(f"speed vs quality: {results.get('preset') or Path(results['bundle']).name} "
                 f"(grey: below the quality floor)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def combos_section(results: dict, analysis: dict) -> list[str]:
    wl = results["workload"]
    lines = ["## Backend combinations", "",
             f"Prompt = {results['model']['image_tokens']} image rows + {wl['prompt_tokens']} text tokens; "
             f"{wl['new_tokens']} new tokens (EOS ignored). Cells: median (min-max) over {wl['runs']} timed runs after "
             f"{wl['warmup']} warm-up. Times in ms.", "",
             "| backends | preprocess | vision b1 | vision b4 / image | prefill | prefill tok/s | TTFT | decode tok/s "
             f"| % roofline | ITL p50 / p95 | end-to-end | follow-up TTFT | self_question n={wl['questions']} shared / "
             "sequential | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(c["label"], c["figures"]) for c in analysis["combos"]]
    if analysis["eager"]:
        rows.append(("PyTorch eager fp32 (baseline)", analysis["eager"]["figures"]))
    for label, f in rows:
        roof = f.get("roofline")
        share = f"{100 * roof['share']:.0f}%" if roof and roof.get("share") is not None else "-"
        sq = (f"{_m(f['self_question_shared_ms'], 0)} / {_m(f['self_question_sequential_ms'], 0)}"
              if "self_question_shared_ms" in f else "-")
        memory = f.get("memory")
        lines.append(f"| {label} | {_m(f['preprocess_ms'])} | {_m(f['encode_ms'], 0)} | {_m(f['encode_batch_per_image_ms'], 0)} "
                     f"| {_m(f['prefill_ms'], 0)} | {_m(f['prefill_tok_s'])} | {_m(f['ttft_ms'], 0)} | {_m(f['decode_tok_s'], 2)} "
                     f"| {share} | {_f(f['itl_p50_ms'])} / {_f(f['itl_p95_ms'])} | {_m(f['e2e_ms'], 0)} "
                     f"| {_m(f.get('followup_ttft_ms'), 0)} | {sq} | {_mib((memory or {}).get('peak_rss_mib'))} |")
    lines.append("")
    lines += assistant_table(analysis)
    for c in analysis["combos"]:
        lines.append(f"- `{c['label']}`: vision {c['vision']['description']}; LLM {c['llm']['description']}")
    if analysis["eager"]:
        lines.append(f"- PyTorch eager fp32: {analysis['eager']['description']}; its preprocessing (transformers' CLIP "
                     f"processor) equals ours to {analysis['eager']['preprocess_parity_max_abs_diff']:.1e}")
    return lines + [""]


def assistant_table(analysis: dict) -> list[str]:
    rows = [(c["label"], c["figures"]["assistant"]) for c in analysis["combos"] if c["figures"].get("assistant")]
    if not rows:
        return []
    lines = ["Through the public API (`Assistant.chat` on a new image each run: template prompt, image encoded once; "
             "then a follow-up question in the same chat; `Assistant.self_question` with a given description). Answers "
             "stop at EOS, so token counts are shown:", "",
             "| backends | first TTFT | answer end-to-end | answer tokens | follow-up TTFT | follow-up prefill tokens "
             "| follow-up vision encodes | self_question n ms | self_question tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for label, a in rows:
        lines.append(f"| {label} | {_m(a['ttft_ms'], 0)} | {_m(a['e2e_ms'], 0)} | {_m(a['answer_tokens'], 0)} "
                     f"| {_m(a['followup_ttft_ms'], 0)} | {_m(a['followup_prefill_tokens'], 0)} "
                     f"| {_m(a['followup_vision_encodes'], 0)} | {_m(a['self_question_ms'], 0)} | {_m(a['self_question_tokens'], 0)} |")
    return lines + [""]


def breakdown_section(analysis: dict) -> list[str]:
    """Where the end-to-end time goes, stage by stage (medians), for each combination and the eager baseline."""
    rows = [(c["label"], c["figures"]) for c in analysis["combos"]]
    if analysis["eager"]:
        rows.append(("PyTorch eager fp32", analysis["eager"]["figures"]))
    lines = ["## Where the time goes (medians, ms and share of end-to-end)", "",
             "| backends | preprocess | vision encode | prefill (+ first token) | decode | decode effective bandwidth |",
             "|---|---|---|---|---|---|"]
    for label, f in rows:
        e2e = f["e2e_ms"]["median"]
        decode = e2e - f["ttft_ms"]["median"]
        cells = [f"{value:,.0f} ({100 * value / e2e:.0f}%)" for value in
                 (f["preprocess_ms"]["median"], f["encode_ms"]["median"], f["prefill_ms"]["median"], decode)]
        roof = f.get("roofline")
        bandwidth = (f"{f['decode_tok_s']['median'] * roof['bytes_per_token'] / 1e9:.1f} GB/s of "
                     f"{analysis['bandwidth_gbps']:.1f}" if roof and f["decode_tok_s"] else "-")
        lines.append(f"| {label} | {' | '.join(cells)} | {bandwidth} |")
    return lines + [""]


def vision_section(analysis: dict) -> list[str]:
    lines = ["## Vision backends (vision tower + projector)", "",
             "| backend | batch 1 ms | batch 4 ms / image | vs eager fp32 | cosine to eager fp32 (min / mean per token) |",
             "|---|---|---|---|---|"]
    eager = analysis["eager"]
    if eager:
        f = eager["figures"]
        lines.append(f"| PyTorch eager fp32 | {_m(f['encode_ms'], 0)} | {_m(f['encode_batch_per_image_ms'], 0)} | 1.00x | reference |")
    for row in analysis["vision"]:
        cos = row["cosine"]
        cos_text = f"{cos['min']:.4f} / {cos['mean']:.4f}" if cos else "-"
        speed = f"{row['speedup_vs_eager']:.2f}x" if row["speedup_vs_eager"] else "-"
        lines.append(f"| {row['label']} | {_m(row['encode_ms'], 0)} | {_m(row['encode_batch_per_image_ms'], 0)} | {speed} | {cos_text} |")
    return lines + [""]


def profile_section(analysis: dict) -> list[str]:
    profiles = analysis.get("vision_profiles") or {}
    if not profiles:
        return []
    lines = ["## Vision encode profile (one image, operators by self time)", ""]
    for label, p in profiles.items():
        ops = ", ".join(f"{o['op']} {o['ms']:,.0f} ms ({100 * o['share']:.0f}%)" for o in p["ops"])
        lines.append(f"- {label} (total {p['total_ms']:,.0f} ms): {ops}")
    return lines + [""]


def overhead_section(analysis: dict) -> list[str]:
    o = analysis["overhead"]
    if o is None:
        return []
    lines = ["## llama.cpp: our runtime vs llama-cpp-python's high-level API (same GGUF, runs interleaved)", "",
             f"Text prompt of {o['prompt_positions']} tokens (as long as image + question), then greedy decode.", "",
             "| runtime | prefill ms | decode tok/s | ITL p50 / p95 ms |", "|---|---|---|---|"]
    for side, name in (("ours", "ours (LlamaCppLLM)"), ("high_level", "llama_cpp.Llama.generate")):
        s = o[side]
        lines.append(f"| {name} | {_m(s['prefill_ms'], 0)} | {_m(s['decode_tok_s'], 2)} | {_f(s['itl_p50_ms'])} / {_f(s['itl_p95_ms'])} |")
    lines += ["", f"- ours: {o['descriptions']['ours']}", f"- high-level: {o['descriptions']['high_level']}"]
    probe = analysis.get("high_level_defaults")
    if probe is not None:
        lines.append(f"- llama-cpp-python's high-level API with all its own defaults on this GGUF: {probe['detail']}")
    return lines + [""]


def render_markdown(results: dict, analysis: dict) -> str:
    title = results.get("preset") or Path(results["bundle"]).name
    lines = [f"# sqllava-edge benchmark: {title}", "", f"Command: `{results['command']}`", "",
             f"Model: {results['model']['name']} ({results['model']['image_tokens']} image tokens, LLM "
             f"{results['model']['llm_layers']} layers x {results['model']['llm_hidden']}); preprocessing "
             f"{results['preprocessing_mode']}; n_ctx {results['n_ctx']}, n_batch {results['n_batch']}; seed "
             f"{results['workload']['seed']}.", ""]
    lines += contention_note(results) + targets_section(analysis) + tuning_section(results, analysis)
    lines += quality_section(results)
    lines += machine_section(results, analysis)
    lines += combos_section(results, analysis)
    lines += breakdown_section(analysis) + vision_section(analysis) + profile_section(analysis) + overhead_section(analysis)
    notes = results["plan"]["notes"]
    if notes or analysis["errors"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [f"- FAILED {e}" for e in analysis["errors"]] + [""]
    return "\n".join(lines)


def render_chart(results: dict, analysis: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, max(3.0, 0.6 * (len(analysis["combos"]) + 3))))
    e2e = [(c["label"], c["figures"]["e2e_ms"]["median"]) for c in analysis["combos"]]
    dec = [(c["label"], c["figures"]["decode_tok_s"]["median"]) for c in analysis["combos"]]
    vis = [(r["label"], r["encode_ms"]["median"]) for r in analysis["vision"] if r["encode_ms"]]
    if analysis["eager"]:
        f = analysis["eager"]["figures"]
        e2e.append(("PyTorch eager fp32", f["e2e_ms"]["median"]))
        dec.append(("PyTorch eager fp32", f["decode_tok_s"]["median"]))
        vis.append(("PyTorch eager fp32", f["encode_ms"]["median"]))
    if analysis["overhead"]:
        dec.append(("llama-cpp-python Llama", analysis["overhead"]["high_level"]["decode_tok_s"]["median"]))
    for ax, data, title in ((axes[0], e2e, "end-to-end ms (lower is better)"),
                            (axes[1], dec, "decode tokens/s (higher is better)"),
                            (axes[2], vis, "vision encode ms, batch 1 (lower is better)")):
        if data:
            ax.barh([d[0] for d in data], [d[1] for d in data], color="#4878a8")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    rooflines = {c["figures"]["roofline"]["tok_s"] for c in analysis["combos"] if c["figures"].get("roofline")}
    for value in rooflines:
        axes[1].axvline(value, color="#c44e52", linestyle="--", label=f"roofline {value:.1f} tok/s")
    if rooflines:
        axes[1].legend(fontsize=8)
    fig.suptitle(f"sqllava-edge {results.get('preset') or Path(results['bundle']).name} on "
                 f"{results['machine']['cpu']['model']} ({results['machine']['threads_used']} threads)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_text_and_json(out_dir: str | os.PathLike, stem: str, text: str, data: Any) -> tuple[Path, Path]:
    """out_dir/STEM.md (the report) and out_dir/STEM.json (the raw samples), each written whole or not at all; the
    side benchmarks (prefill, chunked, train, serve) all write this pair."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / f"{stem}.json", "w") as handle:
        json.dump(data, handle, indent=1)
    with atomic_write(out_dir / f"{stem}.md", "w") as handle:
        handle.write(text)
    return out_dir / f"{stem}.md", out_dir / f"{stem}.json"


def write_outputs(out_dir: str | os.PathLike, results: dict, analysis: dict) -> dict[str, Path]:
    """report.md + results.json + chart.png into out_dir, replacing it atomically."""
    out_dir = Path(out_dir)
    markdown = render_markdown(results, analysis)
    with atomic_dir(out_dir) as tmp:
        (tmp / "report.md").write_text(markdown)
        (tmp / "results.json").write_text(json.dumps({**results, "analysis": analysis}, indent=1, default=float))
        render_chart(results, analysis, tmp / "chart.png")
        if _quality_points(results):
            render_quality_chart(results, tmp / "quality.png")
    outputs = {"report": out_dir / "report.md", "json": out_dir / "results.json", "chart": out_dir / "chart.png"}
    if _quality_points(results):
        outputs["quality_chart"] = out_dir / "quality.png"
    return outputs
