"""Prefill speed of the image rows on a CPU, llama.cpp settings side by side: one script, one run.

    python -m benchmarks.prefill [--preset bench-1b] [--quant q4_k_m q4_0 q4_k_s iq4_nl] [--ubatch 64 128 256 512]
                                 [--threads 2] [--repeats 3] [--out DIR]

Measures the prefill of the model's image rows (random embeddings) + a 32-token question through LlamaCppLLM for
every GGUF type x weight repacking on/off x micro-batch size (n_batch = n_ubatch, so the prefill is split into calls
of that many rows, as the runtime does), plus the PyTorch eager fp32 prefill of the same rows as the reference. Rounds
are interleaved (each round visits every setting, in reversed order every other round), so a drifting background load
hits them all alike; the report shows medians and the ratio to PyTorch measured in the same rounds.

The GGUFs are exported once from the preset's random-weight checkpoint into $SQLLAVA_EDGE_CACHE/bench/prefill-*
with `python -m export.gguf`; each type's top-1 agreement with the PyTorch fp32 logits on the validation prompt comes
from that export's manifest (the same check every export records).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.presets import cache_root, ensure_preset
from benchmarks.report import write_text_and_json
from sqllava_edge.fileutil import atomic_dir

QUANTS = ["q4_k_m", "q4_0", "q4_k_s", "iq4_nl"]
UBATCHES = [64, 128, 256, 512]
QUESTION = 32


def ensure_ggufs(preset: str, checkpoint: Path, quants: list[str], log=print) -> Path:
    """A bundle folder holding only the GGUFs of `quants` exported from `checkpoint` (cached by content)."""
    from export import EXPORT_CODE_VERSION, tool_versions

    key = hashlib.sha256(json.dumps({"checkpoint": checkpoint.parent.name, "quants": sorted(quants),
                                     "export": EXPORT_CODE_VERSION, "tools": tool_versions("gguf", "llama_cpp_python")},
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = cache_root() / f"prefill-{preset}-{key}"
    if (folder / "manifest.json").is_file():
        return folder
    log(f"[prefill] exporting {', '.join(quants)} into {folder} (once)")
    with atomic_dir(folder) as tmp:
        done = subprocess.run([sys.executable, "-m", "export.gguf", str(checkpoint), "--out", str(tmp / "bundle"),
                               "--quant", *quants], stdout=sys.stderr, cwd=Path(__file__).resolve().parents[1])
        if done.returncode != 0:
            raise RuntimeError(f"python -m export.gguf exited with {done.returncode} (see above)")
        for item in (tmp / "bundle").iterdir():
            item.rename(tmp / item.name)
    return folder


def agreements(bundle: Path) -> dict[str, dict]:
    """quant -> the export's validation record (top-1 agreement with PyTorch fp32 on the validation prompt)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {a["precision"]: a.get("validation") or {} for a in manifest["artifacts"] if a["kind"] == "llm_gguf"}


def time_llamacpp(path: Path, ubatch: int, extra_buffers: bool, threads: int, image: np.ndarray,
                  question: list[int]) -> float:
    """Seconds for one prefill of the image rows + question in a freshly loaded context (after a short warm-up)."""
    from runtimes.llamacpp import LlamaCppLLM

    with LlamaCppLLM(path, n_ctx=len(image) + len(question) + 16, n_seq_max=1, n_threads=threads,
                     n_threads_batch=threads, n_batch=ubatch, n_ubatch=ubatch, extra_buffers=extra_buffers) as llm:
        llm.prefill(0, tokens=question[:4])  # warm-up: first use of the (repacked) weights
        llm.release(0)
        start = time.perf_counter()
        llm.prefill(0, embeds=image)
        llm.prefill(0, tokens=question)
        return time.perf_counter() - start


def torch_prefill(checkpoint: Path, threads: int):
    """-> fn(image, question) timing PyTorch eager fp32's prefill of the same rows (inputs_embeds, KV cache on)."""
    import torch

    from sqllava_edge.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    model, _ = load_checkpoint(checkpoint, merge_lora=True, dtype=torch.float32)
    llm = model.eval().llm

    def run(image: np.ndarray, question: list[int]) -> float:
        with torch.inference_mode():
            text = llm.get_input_embeddings()(torch.tensor([question]))
            embeds = torch.cat([torch.from_numpy(image)[None], text], dim=1)
            start = time.perf_counter()
            llm(inputs_embeds=embeds, use_cache=True)
            return time.perf_counter() - start

    return run


def measure(args, log=print) -> dict:
    from tqdm import tqdm

    from sqllava_edge.config import get_preset

    checkpoint, _ = ensure_preset(args.preset, log=log)
    ggufs = ensure_ggufs(args.preset, checkpoint, args.quant, log=log)
    config = get_preset(args.preset)
    rng = np.random.default_rng(0)
    rows = config.num_image_tokens
    image = (rng.standard_normal((rows, config.llm.hidden_size)) * 0.02).astype(np.float32)
    question = [int(t) for t in rng.integers(3, config.llm.vocab_size, size=QUESTION)]
    settings = [(q, extra, ub) for q in args.quant for extra in (True, False) for ub in args.ubatch]
    samples: dict[str, list[float]] = {"torch": []}
    samples.update({_name(*s): [] for s in settings})
    torch_run = torch_prefill(checkpoint, args.threads) if not args.no_torch else None
    if torch_run:
        torch_run(image[:8], question[:4])  # warm-up
    progress = tqdm(total=args.repeats * (len(settings) + bool(torch_run)), desc="prefill", unit="run",
                    dynamic_ncols=True)
    for r in range(args.repeats):
        order = settings if r % 2 == 0 else settings[::-1]
        if torch_run and r % 2 == 0:
            samples["torch"].append(torch_run(image, question))
            progress.update(1)
        for quant, extra, ub in order:
            name = _name(quant, extra, ub)
            progress.set_postfix_str(f"round {r + 1}: {name}")
            try:
                samples[name].append(time_llamacpp(ggufs / "llm" / f"model.{quant}.gguf", ub, extra, args.threads,
                                                   image, question))
            except Exception as exc:  # noqa: BLE001  one setting failing must not end the run
                log(f"[prefill] {name} failed: {exc}")
            progress.update(1)
        if torch_run and r % 2 == 1:
            samples["torch"].append(torch_run(image, question))
            progress.update(1)
    progress.close()
    return {"preset": args.preset, "rows": rows, "question": QUESTION, "threads": args.threads,
            "repeats": args.repeats, "command": "python -m benchmarks.prefill " + " ".join(sys.argv[1:]),
            "load_average_end": list(__import__("os").getloadavg()), "gguf_folder": str(ggufs),
            "agreement": agreements(ggufs), "samples": samples}


def _name(quant: str, extra: bool, ubatch: int) -> str:
    return f"{quant} repack {'on' if extra else 'off'} ubatch {ubatch}"


def render(result: dict) -> str:
    positions = result["rows"] + result["question"]
    torch_s = statistics.median(result["samples"]["torch"]) if result["samples"].get("torch") else None
    lines = [f"# Prefill of {result['rows']} image rows + {result['question']} tokens, {result['threads']} threads, "
             f"{result['repeats']} interleaved rounds", "", f"Command: `{result['command']}`; 1-minute load average "
             f"at the end {result['load_average_end'][0]:.2f}.", ""]
    if torch_s:
        lines += [f"PyTorch eager fp32 prefill: median {torch_s:.2f} s = {positions / torch_s:.0f} tok/s "
                  f"(runs {', '.join(f'{s:.2f}' for s in result['samples']['torch'])} s)", ""]
    lines += pivot(result, positions, torch_s)
    lines += ["| GGUF | repacking | n_batch = n_ubatch | median s | tok/s (median) | best tok/s | vs PyTorch fp32 |",
              "|---|---|---|---|---|---|---|"]
    for name, runs in result["samples"].items():
        if name == "torch":
            continue
        quant, _, repack, _, ub = name.split()
        if not runs:
            lines.append(f"| {quant} | {repack} | {ub} | failed | - | - | - |")
            continue
        med = statistics.median(runs)
        ratio = f"{torch_s / med:.2f}x" if torch_s else "-"
        lines.append(f"| {quant} | {repack} | {ub} | {med:.2f} | {positions / med:.0f} | {positions / min(runs):.0f} "
                     f"| {ratio} |")
    lines += ["", "Top-1 agreement with PyTorch fp32 logits on the export's validation prompt:", "",
              "| GGUF | top-1 agreement | max abs diff | positions |", "|---|---|---|---|"]
    for quant, v in result["agreement"].items():
        lines.append(f"| {quant} | {v.get('top1_agreement', '-')} | {v.get('max_abs_diff', 0):.3g} "
                     f"| {v.get('positions', '-')} |")
    return "\n".join(lines) + "\n"


def pivot(result: dict, positions: int, torch_s: float | None) -> list[str]:
    """Median tok/s per GGUF type x repacking (rows) and micro-batch size (columns), with the ratio to PyTorch."""
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for name, runs in result["samples"].items():
        if name == "torch":
            continue
        quant, _, repack, _, ub = name.split()
        med = statistics.median(runs) if runs else None
        text = "failed" if med is None else f"{positions / med:.0f}" + (f" ({torch_s / med:.2f}x)" if torch_s else "")
        cells.setdefault((quant, repack), {})[int(ub)] = text
    sizes = sorted({ub for row in cells.values() for ub in row})
    lines = ["Median prefill tok/s (ratio to PyTorch eager fp32 in the same rounds) by micro-batch size:", "",
             "| GGUF | repacking | " + " | ".join(f"n_ubatch {ub}" for ub in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for (quant, repack), row in cells.items():
        lines.append(f"| {quant} | {repack} | " + " | ".join(row.get(ub, "-") for ub in sizes) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefill", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="bench-1b")
    parser.add_argument("--quant", nargs="+", default=QUANTS, help=f"GGUF types (default {' '.join(QUANTS)})")
    parser.add_argument("--ubatch", nargs="+", type=int, default=UBATCHES, help="n_batch = n_ubatch values")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager fp32 reference")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results/prefill"))
    args = parser.parse_args(argv)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    result = measure(args, log)
    text = render(result)
    write_text_and_json(args.out, "prefill", text, result)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
