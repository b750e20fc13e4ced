"""One tuning probe, run in a child process by runtimes.tune.run_probe: `python -m runtimes.tune_probe SPEC_JSON`.

Prints one JSON line on success: {"runs": [...]} for vision, {"runs": [...], "ubatch_runs": [...]} for an LLM. A crash (SIGILL in a repacked kernel) or a hang ends only this
process; the parent records the option as unusable. Inputs are random: only the time matters here.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def probe_vision(spec: dict) -> list[dict]:
    from runtimes.vision import OnnxVision

    size = spec["image_size"]
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    runs = []
    for threads in spec["threads"]:
        vision = OnnxVision(spec["path"], ("cpu",), n_threads=threads)
        try:
            vision.encode(pixels)  # warm-up
            times = []
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                vision.encode(pixels)
                times.append(time.perf_counter() - start)
            runs.append({"n_threads": threads, "encode_s": min(times)})
        finally:
            vision.close()
    return runs


def _open_llm(spec: dict, rows: int, n_ubatch: int | None = None):
    from runtimes.llamacpp import LlamaCppLLM

    exact = spec["exact"]
    return LlamaCppLLM(spec["path"], n_ctx=rows + spec["question"] + spec["decode"] + 16, n_seq_max=1,
                       n_threads=max(spec["threads"]), extra_buffers=spec["extra_buffers"], n_ubatch=n_ubatch,
                       kv_type="f32" if exact else "f16", flash_attn=False if exact else None)


def _inputs(llm, rows: int, question: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(0)
    image = (rng.standard_normal((rows, llm.n_embd)) * 0.02).astype(np.float32)
    return image, [int(t) for t in rng.integers(3, llm.vocab_size, size=question)]


def probe_llm(spec: dict) -> tuple[list[dict], list[dict]]:
    """-> (runs per thread count, prefill runs per micro-batch size on the best prefill thread count)."""
    runs = probe_threads(spec)
    threads = max(runs, key=lambda r: r["prefill_tok_s"])["n_threads"]
    return runs, [probe_ubatch(spec, n_ubatch, threads) for n_ubatch in spec.get("ubatches", [])]


def probe_ubatch(spec: dict, n_ubatch: int, threads: int) -> dict:
    """The best of `repeats` prefills of ubatch_rows image rows + the question with this micro-batch size."""
    rows = spec["ubatch_rows"]
    llm = _open_llm(spec, rows, n_ubatch)
    try:
        llm.set_threads(threads, threads)
        image, tokens = _inputs(llm, rows, spec["question"])
        llm.prefill(0, tokens=tokens[:4])  # warm-up
        llm.release(0)
        best = float("inf")
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            llm.prefill(0, embeds=image)
            llm.prefill(0, tokens=tokens)
            best = min(best, time.perf_counter() - start)
            llm.release(0)
    finally:
        llm.close()
    return {"n_ubatch": n_ubatch, "n_threads": threads, "prefill_tok_s": (rows + len(tokens)) / best}


def probe_threads(spec: dict) -> list[dict]:
    rows, question, steps = spec["rows"], spec["question"], spec["decode"]
    llm = _open_llm(spec, rows)
    image, tokens = _inputs(llm, rows, question)
    runs = []
    try:
        llm.prefill(0, tokens=tokens[:4])  # warm-up: first use of the (repacked) weights
        llm.release(0)
        for threads in spec["threads"]:
            llm.set_threads(threads, threads)  # prefill runs on n_threads_batch, single tokens on n_threads
            prefill_s = decode_s = float("inf")
            for _ in range(spec["repeats"]):  # the best run: the one other processes disturbed least
                start = time.perf_counter()
                llm.prefill(0, embeds=image)
                logits = llm.prefill(0, tokens=tokens)
                prefill_s = min(prefill_s, time.perf_counter() - start)
                start = time.perf_counter()
                for _ in range(steps):
                    logits = llm.decode({0: int(np.argmax(logits))})[0]
                decode_s = min(decode_s, time.perf_counter() - start)
                llm.release(0)
            runs.append({"n_threads": threads, "prefill_tok_s": (rows + question) / prefill_s,
                         "decode_tok_s": steps / decode_s})
    finally:
        llm.close()
    return runs


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    if spec["kind"] == "vision":
        print(json.dumps({"runs": probe_vision(spec)}))
    else:
        runs, ubatch_runs = probe_llm(spec)
        print(json.dumps({"runs": runs, "ubatch_runs": ubatch_runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
