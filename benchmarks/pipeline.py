"""Measurements on our runtime backends (runtimes.base protocols): one pipeline run, a cached follow-up question,
self_question shared-prefix vs sequential, vision batches. Each function does one run and returns its raw samples.

A pipeline run: preprocess -> vision encode (batch 1) -> prefill (image rows + P text tokens) -> first token (TTFT)
-> G-1 decode steps (G tokens in all, EOS ignored). The follow-up question then prefills only the last answer token
and P new text tokens into the same sequence (image and KV cache reused) and takes its first token.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from benchmarks.timing import ms, now
from sqllava_edge.generation import TASK_DEFAULTS, GenerationConfig, Sampler
from sqllava_edge.image import preprocess

GREEDY = GenerationConfig(max_new_tokens=1)  # docs/spec.md 5.3's answer decoding (greedy); max_new_tokens is not used here
SELF_QUESTION = TASK_DEFAULTS["self_question"]  # docs/spec.md 5.3: T 1.2, top-k 300, top-p 0.95


def encode_one(vision, pixels: np.ndarray) -> np.ndarray:
    """(3, S, S) -> (T, H)."""
    return vision.encode(pixels[None])[0]


def decode_steps(llm, first: dict[int, int], steps: int, samplers: dict[int, Sampler]) -> tuple[dict[int, list[int]], list[float]]:
    """`steps` batched decode steps over the sequences in `first`; -> (tokens per sequence, seconds per step)."""
    tokens = {seq: [tok] for seq, tok in first.items()}
    latencies = []
    current = dict(first)
    for _ in range(steps):
        start = now()
        logits = llm.decode(current)
        current = {seq: samplers[seq](logits[seq]) for seq in current}
        latencies.append(now() - start)
        for seq, tok in current.items():
            tokens[seq].append(tok)
    return tokens, latencies


def pipeline_run(vision, llm, config, mode: str, image, prompt: Sequence[int], followup: Sequence[int],
                 new_tokens: int) -> dict:
    """One full answer, then a cached follow-up question's first token. Times in ms; `itl_ms` per decode step."""
    llm.release(0)
    before = llm.counters.snapshot()
    t0 = now()
    pixels = preprocess(image, config.vision, mode)  # (3, S, S)
    t1 = now()
    embeds = encode_one(vision, pixels)  # (T, H)
    t2 = now()
    llm.prefill(0, embeds=embeds)
    sampler = Sampler(GREEDY)
    first = sampler(llm.prefill(0, tokens=list(prompt)))
    t3 = now()
    tokens, steps = decode_steps(llm, {0: first}, new_tokens - 1, {0: sampler})
    t4 = now()
    # Follow-up question on the same image: no vision encode, prefill only [last answer token] + new text.
    t5 = now()
    sampler(llm.prefill(0, tokens=[tokens[0][-1], *followup]))
    t6 = now()
    after = llm.counters.snapshot()
    decode_s = t4 - t3
    return {
        "preprocess_ms": ms(t1 - t0), "encode_ms": ms(t2 - t1), "prefill_ms": ms(t3 - t2), "ttft_ms": ms(t3 - t0),
        "decode_ms": ms(decode_s), "itl_ms": [ms(s) for s in steps],
        "decode_tok_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None,
        "e2e_ms": ms(t4 - t0), "followup_ttft_ms": ms(t6 - t5),
        "prefill_positions": int(embeds.shape[0]) + len(prompt), "tokens": tokens[0],
        "followup_prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"] - len(prompt),
    }


def self_question_run(vision, llm, config, mode: str, image, prompt: Sequence[int], n: int, new_tokens: int,
                      seed: int, shared: bool) -> dict:
    """self_question(n): the image and prompt, then n sampled answers of `new_tokens` tokens each.

    shared: prefill once, fork the prefix into n sequences, decode them as one batch (what Assistant.self_question
    does). Sequential: prefill and decode each sample on its own. Both encode the image once.
    """
    for seq in range(n):
        llm.release(seq)
    samplers = {seq: Sampler(SELF_QUESTION, seed + seq) for seq in range(n)}
    t0 = now()
    embeds = encode_one(vision, preprocess(image, config.vision, mode))  # (T, H)
    if shared:
        llm.prefill(0, embeds=embeds)
        logits = llm.prefill(0, tokens=list(prompt))
        for seq in range(1, n):
            llm.fork(0, seq)
        first = {seq: samplers[seq](logits) for seq in range(n)}
        tokens, _ = decode_steps(llm, first, new_tokens - 1, samplers)
    else:
        tokens = {}
        for seq in range(n):
            llm.release(0)
            llm.prefill(0, embeds=embeds)
            first = samplers[seq](llm.prefill(0, tokens=list(prompt)))
            out, _ = decode_steps(llm, {0: first}, new_tokens - 1, {0: samplers[seq]})
            tokens[seq] = out[0]
    elapsed = now() - t0
    for seq in range(n):
        llm.release(seq)
    return {"ms": ms(elapsed), "tokens": [len(t) for t in tokens.values()]}


def vision_batch_run(vision, pixels: np.ndarray) -> dict:
    """One encode call on a (B, 3, S, S) batch."""
    t0 = now()
    out = vision.encode(pixels)
    elapsed = now() - t0
    assert out.shape[0] == pixels.shape[0]
    return {"ms": ms(elapsed), "per_image_ms": ms(elapsed / pixels.shape[0])}


def cosine_per_token(embeds: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Cosine similarity of each image token's embedding (rows) to the reference's; min and mean."""
    a = embeds.reshape(-1, embeds.shape[-1]).astype(np.float64)
    b = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {"min": float(cos.min()), "mean": float(cos.mean()), "max_abs_diff": float(np.abs(a - b).max())}


# --------------------------------------------------------------------------------------------------------------------
# Through the public API (Assistant): real template, tokenizer, image cache and prefix reuse. Token counts depend on
# when the random weights emit EOS, so every run records how many tokens it produced.

QUESTION = "What is happening in this picture? Describe the main objects, their colours and where they are."
FOLLOWUP = "Which object is the largest, and why might it be there?"
DESCRIPTION = "A wide picture with soft colour gradients from dark blue in one corner to warm orange in the other."


def _first_piece(pieces) -> tuple[float, int]:
    """Consume a text stream; -> (time of the first non-empty piece, or of the end if none came; pieces seen)."""
    first, count = None, 0
    for piece in pieces:
        count += 1
        if first is None and piece:
            first = now()
    return (first if first is not None else now()), count


def assistant_chat_run(assistant, image, new_tokens: int) -> dict:
    """A new image (encoded), a question (G tokens at most), then a follow-up in the same chat (first token)."""
    counters = assistant.counters
    before = counters.snapshot()
    t0 = now()
    chat = assistant.chat(image)
    first, _ = _first_piece(chat.stream(QUESTION, max_new_tokens=new_tokens))
    t1 = now()
    mid = counters.snapshot()
    t2 = now()
    follow_first, _ = _first_piece(chat.stream(FOLLOWUP, max_new_tokens=1))
    after = counters.snapshot()
    return {"ttft_ms": ms(first - t0), "e2e_ms": ms(t1 - t0), "answer_tokens": mid["decode_tokens"] - before["decode_tokens"] + 1,
            "followup_ttft_ms": ms(follow_first - t2),
            "followup_vision_encodes": after["vision_encodes"] - mid["vision_encodes"],
            "followup_prefill_tokens": after["prefill_tokens"] - mid["prefill_tokens"],
            "first_prefill_positions": mid["prefill_tokens"] + mid["prefill_embeds"] - before["prefill_tokens"] - before["prefill_embeds"]}


def assistant_self_question_run(assistant, image, n: int, new_tokens: int, seed: int) -> dict:
    """Assistant.self_question(n) with a given description (the describe step is a plain answer, measured above)."""
    before = assistant.counters.snapshot()
    t0 = now()
    result = assistant.self_question(image, n=n, seed=seed, description=DESCRIPTION, max_new_tokens=new_tokens)
    elapsed = now() - t0
    after = assistant.counters.snapshot()
    return {"ms": ms(elapsed), "questions": len(result.questions),
            "decode_tokens": after["decode_tokens"] - before["decode_tokens"]}
