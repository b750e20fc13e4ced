"""One measurement job per process: the PyTorch eager baseline, llama.cpp high-level vs ours, a vision backend alone,
or a backend combination. Each job returns a JSON-able dict with every raw sample and the process's peak memory.

Jobs run in a fresh process each (`python -m benchmarks.worker JOB.json RESULT.json`), so one job's memory and
thread pools never leak into the next job's numbers.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.timing import current_rss_mib, gpu_memory_mib, ms, now, peak_rss_mib, repeat
from benchmarks.workload import Workload, prompt_ids, synthetic_image

_CLOCK = {"job_start": now(), "cpu_start": 0.0}  # reset by run_job (jobs may share a process with --in-process)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="run", leave=False, dynamic_ncols=True)


def _interleaved(fns: dict[str, Callable[[], dict]], workload: Workload, progress) -> dict[str, dict[str, list]]:
    """Run several measurements in alternating order each round (ABBA...), so drifting background load hits all."""
    names = list(fns)
    out = {name: {"warmup": [], "timed": []} for name in names}
    for i in range(workload.warmup + workload.runs):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            out[name]["warmup" if i < workload.warmup else "timed"].append(fns[name]())
            progress.set_postfix_str(f"{name} {i + 1}/{workload.warmup + workload.runs}")
            progress.update(1)
    return out


def _memory(result: dict) -> dict:
    """Add the process's peak memory, and its CPU time beside the wall time: on a shared machine, CPU seconds well
    below wall seconds x threads means other processes took the cores during the job."""
    times = os.times()
    result["memory"] = {"peak_rss_mib": round(peak_rss_mib(), 1), "rss_end_mib": current_rss_mib(),
                        "gpu": gpu_memory_mib()}
    result["process"] = {"cpu_seconds": round(times.user + times.system - _CLOCK["cpu_start"], 2),
                         "wall_seconds": round(now() - _CLOCK["job_start"], 2),
                         "load_average_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    return result


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------------------------


def eager_job(job: dict) -> dict:
    """PyTorch eager fp32 pipeline: N answers + vision batches; saves the reference image embeddings for cosines."""
    import torch

    from benchmarks.baselines import clip_processor, eager_pipeline_run, reference_preprocess
    from benchmarks.profile import torch_vision_profile
    from benchmarks.roofline import torch_bytes_per_token
    from sqllava_edge.checkpoint import load_checkpoint
    from sqllava_edge.image import preprocess

    workload, mode = Workload.from_dict(job["workload"]), job["mode"]
    _threads(job["threads"])
    t0 = now()
    model, _ = load_checkpoint(job["checkpoint"], merge_lora=True, dtype=torch.float32)
    model.eval()
    load_ms = ms(now() - t0)
    config = model.config
    processor = clip_processor(config)
    image = synthetic_image(workload, 0)
    prompt = prompt_ids(workload, config.llm.vocab_size, 0)
    parity = float(np.abs(reference_preprocess(processor, image, config, mode) - preprocess(image, config.vision, mode)).max())
    batch = torch.from_numpy(np.stack([reference_preprocess(processor, synthetic_image(workload, i), config, mode)
                                       for i in range(workload.vision_batch)]))  # (B, 3, S, S)

    def encode_batch() -> dict:
        start = now()
        with torch.inference_mode():
            model.encode_images(batch)
        elapsed = now() - start
        return {"ms": ms(elapsed), "per_image_ms": ms(elapsed / batch.shape[0])}

    progress = _progress(2 * (workload.warmup + workload.runs), "eager fp32")
    warm, timed = repeat(lambda: eager_pipeline_run(model, processor, config, mode, image, prompt, workload.new_tokens),
                         workload.runs, workload.warmup, "pipeline", progress)
    b_warm, b_timed = repeat(encode_batch, workload.runs, workload.warmup, f"batch {workload.vision_batch}", progress)
    progress.close()
    np.save(job["reference_path"], timed[-1]["embeds"])
    profile = torch_vision_profile(model, batch[:1].numpy())
    for run in warm + timed:
        run.pop("embeds")
    return _memory({"kind": "eager", "label": "PyTorch eager fp32", "load_ms": load_ms,
                    "description": f"torch {torch.__version__} fp32 eager, transformers generate, {torch.get_num_threads()} threads",
                    "preprocess_parity_max_abs_diff": parity, "roofline_bytes": torch_bytes_per_token(model.llm),
                    "pipeline": {"warmup": warm, "timed": timed}, "vision_batch": {"warmup": b_warm, "timed": b_timed},
                    "profile": profile})


def llamacpp_overhead_job(job: dict) -> dict:
    """llama-cpp-python's high-level Llama.generate vs our LlamaCppLLM, same GGUF, same text prompt, interleaved."""
    from benchmarks.baselines import high_level_run, open_high_level, ours_text_run
    from runtimes.llamacpp import LlamaCppLLM, cpu_has_amx

    workload = Workload.from_dict(job["workload"])
    extra_buffers = not cpu_has_amx()  # what LlamaCppLLM does by default; the baseline gets the same
    ours = LlamaCppLLM(job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"], n_batch=job["n_batch"],
                       flash_attn=True, extra_buffers=extra_buffers)
    raw = open_high_level(job["gguf"], job["n_ctx"], job["threads"], job["n_batch"], True, extra_buffers)
    prompt = prompt_ids(workload, ours.vocab_size, 2, count=job["prompt_positions"])
    progress = _progress(2 * (workload.warmup + workload.runs), "llama.cpp overhead")
    runs = _interleaved({"high_level": lambda: high_level_run(raw, prompt, workload.new_tokens),
                         "ours": lambda: ours_text_run(ours, prompt, workload.new_tokens)}, workload, progress)
    progress.close()
    result = {"kind": "llamacpp_overhead", "label": job["label"], "gguf": job["gguf"], "prompt_positions": len(prompt),
              "ours_description": ours.description,
              "high_level_description": f"llama_cpp.Llama.generate (llama-cpp-python {_llama_version()}), n_ctx "
                                        f"{job['n_ctx']}, n_batch {job['n_batch']}, {job['threads']} threads, "
                                        f"flash attention on, weight-repacking buffers {'on' if extra_buffers else 'off'}",
              "runs": runs}
    ours.close()
    raw.close()
    return _memory(result)


def high_level_defaults_job(job: dict) -> dict:
    """Does llama-cpp-python's high-level API run this GGUF with its own defaults? (It may die: the worker reports how.)"""
    from benchmarks.baselines import open_high_level

    workload = Workload.from_dict(job["workload"])
    llm = open_high_level(job["gguf"], job["n_ctx"], job["threads"], job["n_batch"], None, None)
    t0 = now()
    llm.eval(prompt_ids(workload, llm.n_vocab(), 2, count=8))
    return {"kind": "high_level_defaults", "label": job["label"], "ok": True, "eval_ms": ms(now() - t0)}


def _llama_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


# --------------------------------------------------------------------------------------------------------------------
# Our backends


def _load(job: dict, part: str, sources: dict):
    """Load the vision or LLM backend a job names, through runtimes.select and runtimes.loader (what Assistant uses).
    `sources` holds the opened bundle / checkpoint, so torch vision and torch LLM share one loaded model."""
    from runtimes import select
    from runtimes.devices import resolve_device
    from runtimes.loader import load_llm, load_vision
    from runtimes.model_source import ModelSource

    spec = job[part]
    device = resolve_device(job.get("device"))
    folder = job["checkpoint"] if spec["kind"] == "torch" else job["bundle"]
    if folder is None:
        raise ValueError(f"the torch {part} backend needs the training checkpoint; pass --checkpoint")
    source = sources.get(folder) or ModelSource.open(folder)
    sources[folder] = source
    t0 = now()
    if part == "vision":
        choice = select.choose_vision(source, device, spec["kind"], spec.get("precision"))
        backend = load_vision(choice, source, device, n_threads=job["threads"])
    else:
        choice = select.choose_llm(source, device, spec["kind"], spec.get("precision"))
        backend = load_llm(choice, source, device, job["n_ctx"], n_threads=job["threads"], n_seq_max=4)
    return backend, {"kind": spec["kind"], "precision": _precision(choice), "description": backend.description,
                     "reason": choice.reason, "load_ms": ms(now() - t0),
                     "artifact": getattr(choice.artifact, "path", None)}, source.config


def _precision(choice) -> str:
    return choice.artifact.precision if choice.artifact is not None else "fp32"


def _onnx_profile(job: dict, config, workload: Workload, mode: str) -> dict | None:
    """onnxruntime's operator profile of one CPU encode of the job's vision ONNX (None for other backends)."""
    from benchmarks.profile import onnx_vision_profile
    from sqllava_edge.bundle import read_manifest
    from sqllava_edge.image import preprocess

    spec = job["vision"]
    if spec["kind"] != "onnxruntime":
        return None
    manifest = read_manifest(job["bundle"], verify=False)
    path = manifest.resolve(job["bundle"], manifest.find("vision_onnx", spec["precision"]))
    pixels = preprocess(synthetic_image(workload, 0), config.vision, mode)[None]  # (1, 3, S, S)
    return onnx_vision_profile(path, pixels, job["threads"])


def _vision_measurements(vision, config, workload: Workload, mode: str, reference: Path | None, progress) -> dict:
    from benchmarks.pipeline import cosine_per_token, encode_one, vision_batch_run
    from sqllava_edge.image import preprocess, preprocess_batch

    batch = preprocess_batch([synthetic_image(workload, i) for i in range(workload.vision_batch)], config.vision, mode)
    warm, timed = repeat(lambda: vision_batch_run(vision, batch), workload.runs, workload.warmup,
                         f"vision batch {workload.vision_batch}", progress)
    out: dict[str, Any] = {"vision_batch": {"warmup": warm, "timed": timed}}
    if reference is not None and Path(reference).is_file():
        embeds = encode_one(vision, preprocess(synthetic_image(workload, 0), config.vision, mode))
        out["cosine_vs_eager_fp32"] = cosine_per_token(embeds, np.load(reference))
    return out


def vision_job(job: dict) -> dict:
    """A vision backend alone: preprocess, batch 1, batch B, cosine to the eager fp32 embeddings."""
    from benchmarks.pipeline import encode_one
    from sqllava_edge.image import preprocess

    workload, mode = Workload.from_dict(job["workload"]), job["mode"]
    vision, info, config = _load(job, "vision", {})
    image = synthetic_image(workload, 0)

    def single() -> dict:
        t0 = now()
        pixels = preprocess(image, config.vision, mode)
        t1 = now()
        encode_one(vision, pixels)
        return {"preprocess_ms": ms(t1 - t0), "encode_ms": ms(now() - t1)}

    progress = _progress(2 * (workload.warmup + workload.runs), f"vision {job['label']}")
    warm, timed = repeat(single, workload.runs, workload.warmup, "batch 1", progress)
    result = {"kind": "vision", "label": job["label"], "vision": info, "single": {"warmup": warm, "timed": timed},
              **_vision_measurements(vision, config, workload, mode, job.get("reference_path"), progress)}
    progress.close()
    vision.close()
    result["profile"] = _onnx_profile(job, config, workload, mode)
    return _memory(result)


def _load_combo(job: dict):
    """-> (assistant or None, vision, llm, vision info, llm info, config). Through `Assistant.load` (what users get)
    when both parts come from one folder; a torch + bundle mix is loaded part by part through runtimes.loader."""
    from sqllava_edge.assistant import Assistant

    vision_spec, llm_spec = job["vision"], job["llm"]
    if (vision_spec["kind"] == "torch") != (llm_spec["kind"] == "torch"):
        sources: dict = {}
        vision, vision_info, config = _load(job, "vision", sources)
        llm, llm_info, _ = _load(job, "llm", sources)
        return None, vision, llm, vision_info, llm_info, config
    folder = job["checkpoint"] if vision_spec["kind"] == "torch" else job["bundle"]
    t0 = now()
    if job.get("tuned"):  # what a user gets: nothing given, the measured choice (its threads and llama.cpp settings)
        assistant = Assistant.load(folder, device=job.get("device"), n_ctx=job["n_ctx"], tune=True, prefer="latency")
    else:
        assistant = Assistant.load(folder, device=job.get("device"), vision_backend=vision_spec["kind"],
                                   llm_backend=llm_spec["kind"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                                   vision_precision=vision_spec.get("precision"), llm_precision=llm_spec.get("precision"))
    load_ms = ms(now() - t0)
    b = assistant.backends
    precision = lambda spec: spec.get("precision") or "fp32"  # noqa: E731  torch parts run the checkpoint in fp32
    vision_info = {"kind": vision_spec["kind"], "precision": precision(vision_spec), "description": b.vision_detail,
                   "reason": b.vision_reason, "load_ms": load_ms}
    llm_info = {"kind": llm_spec["kind"], "precision": precision(llm_spec), "description": b.llm_detail,
                "reason": b.llm_reason, "load_ms": load_ms, "memory_plan": b.memory}
    return assistant, assistant.vision, assistant.llm, vision_info, llm_info, assistant.config


def _assistant_measurements(assistant, workload: Workload, progress) -> dict:
    """The public API: a chat on a new image each run (encode + answer + follow-up), and self_question(n)."""
    from benchmarks.pipeline import assistant_chat_run, assistant_self_question_run

    from sqllava_edge.assistant import SEQUENCES

    for seq in range(SEQUENCES):  # the backend-level runs used these sequences: leave them empty, as the pool expects
        assistant.llm.release(seq)
    images = iter(range(100, 100 + 2 * (workload.warmup + workload.runs)))
    chat = repeat(lambda: assistant_chat_run(assistant, synthetic_image(workload, next(images)), workload.new_tokens),
                  workload.runs, workload.warmup, "Assistant chat", progress)
    sq = repeat(lambda: assistant_self_question_run(assistant, synthetic_image(workload, next(images)), workload.questions,
                                                    workload.new_tokens, workload.seed),
                workload.runs, workload.warmup, "Assistant self_question", progress)
    return {"chat": {"warmup": chat[0], "timed": chat[1]}, "self_question": {"warmup": sq[0], "timed": sq[1]}}


def combo_job(job: dict) -> dict:
    """A vision + LLM combination: pipeline runs (with the cached follow-up), self_question shared vs sequential,
    vision batches and cosine."""
    from benchmarks.pipeline import pipeline_run, self_question_run

    workload, mode = Workload.from_dict(job["workload"]), job["mode"]
    rss_start = current_rss_mib()
    assistant, vision, llm, vision_info, llm_info, config = _load_combo(job)
    rss_loaded = current_rss_mib()
    image = synthetic_image(workload, 0)
    prompt = prompt_ids(workload, llm.vocab_size, 0)
    followup = prompt_ids(workload, llm.vocab_size, 1)
    rounds = workload.warmup + workload.runs
    progress = _progress((4 + 2 * (assistant is not None)) * rounds, f"combo {job['label']}")
    warm, timed = repeat(lambda: pipeline_run(vision, llm, config, mode, image, prompt, followup, workload.new_tokens),
                         workload.runs, workload.warmup, "pipeline", progress)
    counters_after_pipeline = llm.counters.snapshot()
    sq = _interleaved({name: (lambda shared=shared: self_question_run(
        vision, llm, config, mode, image, prompt, workload.questions, workload.new_tokens, workload.seed, shared))
        for name, shared in (("shared", True), ("sequential", False))}, workload, progress)
    vis = _vision_measurements(vision, config, workload, mode, job.get("reference_path"), progress)
    api = _assistant_measurements(assistant, workload, progress) if assistant is not None else None
    progress.close()
    result = {"kind": "combo", "label": job["label"], "tuned": bool(job.get("tuned")), "vision": vision_info, "llm": llm_info,
              "loaded_by": "Assistant.load" if assistant is not None else "runtimes.loader (parts from two folders)",
              "pipeline": {"warmup": warm, "timed": timed}, "self_question": sq, **vis, "assistant": api,
              "counters_after_pipeline": counters_after_pipeline,
              "rss_before_load_mib": rss_start, "rss_after_load_mib": rss_loaded}
    if assistant is not None:
        assistant.close()
    else:
        vision.close()
        llm.close()
    result["profile"] = _onnx_profile(job, config, workload, mode)
    gc.collect()
    return _memory(result)


JOBS = {"eager": eager_job, "llamacpp_overhead": llamacpp_overhead_job, "high_level_defaults": high_level_defaults_job, "vision": vision_job, "combo": combo_job}


def run_job(job: dict) -> dict:
    if job["kind"] not in JOBS:
        raise ValueError(f"unknown job kind {job['kind']!r}; known: {', '.join(JOBS)}")
    times = os.times()
    _CLOCK.update(job_start=now(), cpu_start=times.user + times.system)
    return JOBS[job["kind"]](dict(job))
