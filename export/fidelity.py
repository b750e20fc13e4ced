"""Task-free fidelity of every artifact against the fp32 PyTorch model, recorded in the manifest at export.

    pairs = calibration_pairs(config, tokenizer, data="eval.json", n=16)     # or the checkpoint's training data
    records = measure_fidelity(model, tokenizer, bundle_dir, artifacts, pairs)  # {artifact path: fidelity dict}

On N calibration pairs (image, question, reference answer), teacher-forced through `{system} USER: <image>\\n{q}
ASSISTANT: {answer}</s>`, at every answer position (the positions predicting the answer's tokens and its EOS):
- vision ONNX: per-token cosine (min / mean) of its projected image tokens vs PyTorch's, and the fp32 PyTorch LLM's
  next-token distribution with these tokens vs with PyTorch's: mean KL(fp32 || artifact) in nats and top-1 agreement;
- GGUF: the same KL and top-1 with PyTorch's fp32 image tokens as input (so LLM and vision errors are told apart),
  run as the runtime runs it (runtimes.llamacpp, the runtime's KV type); and per vision ONNX of the bundle, the KL and
  top-1 of that pairing (`with_vision`), the numbers of what a combination deploys;
- for the CPU rule-based pairing (int8 vision where present, the GGUF first in runtimes.select's CPU order), the share
  of pairs whose greedy answer (at most GREEDY_TOKENS tokens) is token for token PyTorch's (`end_to_end`).
Top-1 is also given at the confident positions (fp32's top token >= runtimes.quality.CONFIDENT), what the quality
floor of the automatic choice reads (runtimes.quality).

Calibration pairs, first found: the given LLaVA JSON (--calibration: the eval set if you have one), else the training
data recorded beside the checkpoint (train_config.json), else the GGUF validation prompt on a seeded random image.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DEFAULT_PAIRS = 16
GREEDY_TOKENS = 16


@dataclass(frozen=True)
class Pair:
    pixels: np.ndarray  # (3, S, S) float32, the runtime's preprocessing
    question: str
    answer: str


@dataclass(frozen=True)
class Calibration:
    pairs: list[Pair]
    source: str  # where they came from


def calibration_pairs(config, tokenizer, checkpoint: Path | None = None, data: str | Path | None = None,
                      n: int = DEFAULT_PAIRS, image_folder: str | Path | None = None) -> Calibration:
    """N pairs: the first question and answer of each of the first N images of `data`, else of the training data
    recorded beside `checkpoint`, else the GGUF validation text on seeded random pixels."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"calibration pairs must be a positive int, got {n!r}")
    if data is None and checkpoint is not None:
        recorded = Path(checkpoint).parent / "train_config.json"
        if recorded.is_file():
            cfg = json.loads(recorded.read_text())
            if cfg.get("data") and Path(cfg["data"]).is_file():
                data, image_folder = cfg["data"], cfg.get("image_folder")
    if data is not None:
        return _from_json(config, Path(data), n, image_folder)
    from export.gguf import VALIDATION_TEXT

    rng = np.random.default_rng(0)
    size = config.vision.image_size
    pairs = [Pair(rng.standard_normal((3, size, size)).astype(np.float32), "Describe the image.",
                  " ".join(VALIDATION_TEXT.split()[:12 + i])) for i in range(n)]
    return Calibration(pairs, "the GGUF validation text on seeded random images (no calibration data)")


def _from_json(config, data: Path, n: int, image_folder) -> Calibration:
    from sqllava_edge.image import preprocess

    if not data.is_file():
        raise FileNotFoundError(f"calibration data {data} does not exist; pass a LLaVA JSON (e.g. eval.json)")
    rows = json.loads(data.read_text())
    folder = Path(image_folder) if image_folder else data.parent / "images"
    pairs = []
    for row in rows:
        turns = row.get("conversations") or []
        if "image" not in row or len(turns) < 2:
            continue
        question = turns[0]["value"].replace("<image>", "").strip()
        pixels = preprocess(folder / row["image"], config.vision, config.image_aspect_ratio)
        pairs.append(Pair(pixels, question, turns[1]["value"].strip()))
        if len(pairs) == n:
            break
    if not pairs:
        raise ValueError(f"{data} holds no sample with an image and a question/answer turn; pass a LLaVA JSON")
    return Calibration(pairs, f"{data} ({len(pairs)} images, the first question of each)")


# --------------------------------------------------------------------------------------------------------------------
# Numbers


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(reference: np.ndarray, ours: np.ndarray) -> dict:
    """(n, V) logits of fp32 and of an artifact at the same positions -> KL(fp32 || artifact) and top-1 numbers."""
    from runtimes.quality import CONFIDENT

    log_p, log_q = log_softmax(reference), log_softmax(ours)
    p = np.exp(log_p)
    kl = (p * (log_p - log_q)).sum(-1)  # (n,) nats
    agree = reference.argmax(-1) == ours.argmax(-1)
    confident = p.max(-1) >= CONFIDENT
    return {"positions": int(len(agree)), "kl_mean": float(max(kl.mean(), 0.0)), "kl_max": float(max(kl.max(), 0.0)),
            "top1_agreement": float(agree.mean()), "confident_positions": int(confident.sum()),
            "top1_confident": float(agree[confident].mean()) if confident.any() else None}


def _merge(parts: list[dict]) -> dict:
    """Per-pair comparisons -> one record over all their positions."""
    n = sum(p["positions"] for p in parts)
    confident = sum(p["confident_positions"] for p in parts)
    agree_conf = sum(p["top1_confident"] * p["confident_positions"] for p in parts if p["top1_confident"] is not None)
    return {"positions": n, "kl_mean": round(sum(p["kl_mean"] * p["positions"] for p in parts) / n, 6),
            "kl_max": round(max(p["kl_max"] for p in parts), 6),
            "top1_agreement": round(sum(p["top1_agreement"] * p["positions"] for p in parts) / n, 4),
            "confident_positions": confident,
            "top1_confident": round(agree_conf / confident, 4) if confident else None}


# --------------------------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class _Prompt:
    before: list[int]  # ids before the image (BOS, system, "USER:")
    after: list[int]  # ids after the image: the question, "ASSISTANT:", then the answer and EOS
    answer: int  # answer positions (answer tokens + EOS)


def _prompt(tokenizer, template: str, pair: Pair, eos: int) -> _Prompt:
    from sqllava_edge.config import IMAGE_TOKEN_INDEX
    from sqllava_edge.conversation import Turn, answer_prompt, prompt_ids

    asked = answer_prompt(tokenizer, pair.question, template)
    ids = prompt_ids(tokenizer, [Turn("user", pair.question), Turn("assistant", pair.answer)], template)  # ... </s>
    assert ids[-1] == eos and len(ids) > len(asked), "a finished assistant turn ends with EOS"
    at = ids.index(IMAGE_TOKEN_INDEX)
    return _Prompt(ids[:at], ids[at + 1:], len(ids) - len(asked))


def _torch_logits(model, prompt: _Prompt, embeds) -> np.ndarray:
    """(answer positions, V) fp32 logits of the PyTorch model with image embeds (1, T, H)."""
    import torch

    from sqllava_edge.config import IMAGE_TOKEN_INDEX

    ids = torch.tensor(prompt.before + [IMAGE_TOKEN_INDEX] + prompt.after)
    with torch.inference_mode():
        batch = model.prepare_inputs(ids, image_embeds=torch.as_tensor(embeds))
        # only the rows that predict the answer (and the one after EOS): the LM head is most of a small model's cost
        out = model.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                        logits_to_keep=prompt.answer + 1)
    return out.logits[0, :-1].float().numpy()  # (answer positions, V): the last row follows EOS


def _llama_logits(llm, prompt: _Prompt, embeds: np.ndarray) -> np.ndarray:
    llm.release(0)
    if prompt.before:
        llm.prefill(0, tokens=prompt.before)
    llm.prefill(0, embeds=embeds)
    rows = llm.prefill(0, tokens=prompt.after, all_logits=True)  # row j predicts after[j + 1]
    end = rows.shape[0] - 1
    return rows[end - prompt.answer:end]


def _open_gguf(path: Path, precision: str, n_ctx: int):
    from runtimes.llamacpp import LlamaCppLLM

    exact = precision == "f32"  # as runtimes.loader.load_llm runs it
    return LlamaCppLLM(path, n_ctx=n_ctx, n_seq_max=2, kv_type="f32" if exact else "f16",
                       flash_attn=False if exact else None)


def default_pairing(artifacts) -> tuple[object | None, object | None]:
    """The CPU rule-based pairing: int8 vision where present (else fp32, fp16), the first GGUF in the CPU order."""
    from runtimes.select import GGUF_PREFERENCE

    visions = {a.precision: a for a in artifacts if a.kind == "vision_onnx"}
    ggufs = {a.precision: a for a in artifacts if a.kind == "llm_gguf"}
    vision = next((visions[p] for p in ("int8", "fp32", "fp16") if p in visions), None)
    gguf = next((ggufs[p] for p in GGUF_PREFERENCE["cpu"] if p in ggufs), None)
    return vision, gguf


def measure_fidelity(model, tokenizer, bundle: Path, artifacts: Sequence, calibration: Calibration,
                     measure: set[str] | None = None, log: Callable[[str], None] = print) -> dict[str, dict]:
    """{artifact path: fidelity record} for the vision ONNX and GGUF artifacts in `bundle` (paths in `measure`, or
    all). `model`: the merged fp32 SQLLaVA (not changed)."""
    import torch

    from runtimes.vision import OnnxVision
    from sqllava_edge.generation import TASK_DEFAULTS

    started = time.perf_counter()
    config, template = model.config, model.config.template
    eos = config.llm.eos_token_id
    pairs = calibration.pairs
    prompts = [_prompt(tokenizer, template, pair, eos) for pair in pairs]
    with torch.inference_mode():
        reference = [model.encode_images(torch.from_numpy(p.pixels)[None]).float().numpy() for p in pairs]  # (1, T, H)
    ref_logits = [_torch_logits(model, pr, emb) for pr, emb in zip(prompts, reference)]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")  # float32 unless exported with --dtype
    common = {"pairs": len(pairs), "calibration": calibration.source, "reference": f"PyTorch {dtype} (merged checkpoint)"}
    visions = [a for a in artifacts if a.kind == "vision_onnx"]
    vision_tokens: dict[str, list[np.ndarray]] = {}
    records: dict[str, dict] = {}
    for artifact in visions:
        vision = OnnxVision(bundle / artifact.path)
        try:
            tokens = [vision.encode(p.pixels[None]) for p in pairs]  # (1, T, H) each
        finally:
            vision.close()
        vision_tokens[artifact.precision] = tokens
        if measure is not None and artifact.path not in measure:
            continue
        cos = np.concatenate([_token_cosine(t[0], r[0]) for t, r in zip(tokens, reference)])
        llm = _merge([compare(ref, _torch_logits(model, pr, t)) for ref, pr, t in zip(ref_logits, prompts, tokens)])
        records[artifact.path] = {**common, "cosine_min": round(float(cos.min()), 6),
                                  "cosine_mean": round(float(cos.mean()), 6), **llm,
                                  "measured_through": "the fp32 PyTorch LLM"}
    n_ctx = max(len(p.before) + len(p.after) for p in prompts) + config.num_image_tokens + GREEDY_TOKENS + 8
    pair_vision, pair_gguf = default_pairing(artifacts)
    for artifact in (a for a in artifacts if a.kind == "llm_gguf"):
        if measure is not None and artifact.path not in measure:
            continue
        with _open_gguf(bundle / artifact.path, artifact.precision, n_ctx) as llm:
            own = _merge([compare(ref, _llama_logits(llm, pr, emb[0])) for ref, pr, emb in zip(ref_logits, prompts, reference)])
            record = {**common, **own, "vision_input": "fp32 PyTorch image tokens",
                      "runtime": llm.description.split(",")[0],
                      "with_vision": {p: _merge([compare(ref, _llama_logits(llm, pr, t[0]))
                                                 for ref, pr, t in zip(ref_logits, prompts, tokens)])
                                      for p, tokens in vision_tokens.items()}}
            if artifact is pair_gguf and pair_vision is not None:
                record["end_to_end"] = _greedy_agreement(model, llm, tokenizer, pairs, reference,
                                                         vision_tokens[pair_vision.precision],
                                                         TASK_DEFAULTS["answer"].replace(max_new_tokens=GREEDY_TOKENS))
                record["end_to_end"]["vision"] = pair_vision.precision
        records[artifact.path] = record
    for path, record in records.items():
        extra = f", cosine {record['cosine_mean']:.4f} mean" if "cosine_mean" in record else ""
        log(f"[fidelity] {path}: KL {record['kl_mean']:.4g} nats, top-1 {record['top1_agreement']:.1%} over "
            f"{record['positions']} answer positions{extra}")
    log(f"[fidelity] {len(records)} artifacts on {len(pairs)} calibration pairs in {time.perf_counter() - started:.1f} s "
        f"({calibration.source})")
    return records


def _greedy_agreement(model, llm, tokenizer, pairs, reference, tokens, config) -> dict:
    """Share of pairs whose greedy answer through the deployed pair equals PyTorch's, token for token (both through
    the runtime's one generation step: runtimes.scheduler)."""
    from runtimes.scheduler import Request
    from runtimes.sequences import ImageRef
    from runtimes.tasks import llm_scheduler, tokens as generated
    from runtimes.torch_llm import TorchLLM
    from sqllava_edge.conversation import answer_prompt

    llm.release(0)  # the logit comparisons above wrote into sequence 0 directly
    deployed = llm_scheduler(llm, tokenizer, model.config)
    pytorch = llm_scheduler(TorchLLM(model.llm, llm.n_ctx), tokenizer, model.config)
    same = 0
    for i, (pair, ref, emb) in enumerate(zip(pairs, reference, tokens)):
        ids = answer_prompt(tokenizer, pair.question, model.config.template)
        want = list(generated(pytorch, Request(ids, ImageRef(f"pytorch {i}", ref[0]), config)))
        got = list(generated(deployed, Request(ids, ImageRef(f"deployed {i}", emb[0]), config)))
        same += got == want
    return {"answers": len(pairs), "greedy_agreement": round(same / len(pairs), 4), "max_new_tokens": config.max_new_tokens}


def _token_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
