"""Baselines measured in the same benchmark run as our backends.

* PyTorch eager fp32: what a user of the reference code gets. transformers' CLIP image processor (after LLaVA's
  pad-to-square), the SQLLaVA module's vision tower + projector, the image splice, then transformers'
  `generate(inputs_embeds=...)`, greedy, with `min_new_tokens = max_new_tokens = G` so random weights cannot stop early.
* llama-cpp-python's own high-level API (`llama_cpp.Llama.generate`) on the same GGUF, against our LlamaCppLLM on
  the same text prompt of the same length, runs interleaved so background load hits both alike.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import numpy as np

from benchmarks.timing import ms, now
from sqllava_edge.config import IMAGE_TOKEN_INDEX, ModelConfig


# --------------------------------------------------------------------------------------------------------------------
# PyTorch eager fp32


def clip_processor(config: ModelConfig):
    """transformers' CLIP image processor with the model's numbers (the PIL one the released SQ-LLaVA used)."""
    from transformers import CLIPImageProcessor

    vision = config.vision
    kwargs = dict(image_mean=list(vision.image_mean), image_std=list(vision.image_std), do_convert_rgb=True,
                  size={"shortest_edge": vision.image_size},
                  crop_size={"height": vision.image_size, "width": vision.image_size})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision; falling back to the PIL processor"
        processor = CLIPImageProcessor(**kwargs)
        if getattr(processor, "backend", "pil") != "pil":
            from transformers import CLIPImageProcessorPil

            processor = CLIPImageProcessorPil(**kwargs)
    return processor


def reference_preprocess(processor, image, config: ModelConfig, mode: str) -> np.ndarray:
    """LLaVA's process_images: expand2square with the mean colour ("pad"), then the CLIP processor -> (3, S, S)."""
    from PIL import Image

    if mode == "pad":
        width, height = image.size
        side = max(width, height)
        background = tuple(int(x * 255) for x in config.vision.image_mean)
        square = Image.new("RGB", (side, side), background)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    return np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0], dtype=np.float32)


class _TokenTimes:
    """A transformers streamer that records when each new token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(now())

    def end(self) -> None:
        pass


def eager_pipeline_run(model, processor, config: ModelConfig, mode: str, image, prompt: Sequence[int],
                       new_tokens: int) -> dict:
    """One answer the reference way. Prefill time runs from the splice to the first token."""
    import torch

    t0 = now()
    pixels = reference_preprocess(processor, image, config, mode)  # (3, S, S)
    t1 = now()
    with torch.inference_mode():
        embeds = model.encode_images(torch.from_numpy(pixels)[None])  # (1, T, H)
        t2 = now()
        ids = torch.tensor([IMAGE_TOKEN_INDEX, *prompt], dtype=torch.long)
        batch = model.prepare_inputs(ids, image_embeds=embeds)
        streamer = _TokenTimes()
        out = model.llm.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=config.llm.pad_token_id, eos_token_id=config.llm.eos_token_id,
                                 streamer=streamer)
    t4 = now()
    times = streamer.times
    if len(times) != new_tokens or out.shape[-1] != new_tokens:
        raise RuntimeError(f"transformers generated {out.shape[-1]} tokens ({len(times)} streamed), expected {new_tokens}")
    steps = np.diff(times)
    decode_s = times[-1] - times[0]
    return {"preprocess_ms": ms(t1 - t0), "encode_ms": ms(t2 - t1), "prefill_ms": ms(times[0] - t2),
            "ttft_ms": ms(times[0] - t0), "decode_ms": ms(decode_s), "itl_ms": [ms(s) for s in steps],
            "decode_tok_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None, "e2e_ms": ms(t4 - t0),
            "prefill_positions": int(batch.inputs_embeds.shape[1]), "embeds": embeds[0].float().numpy()}


# --------------------------------------------------------------------------------------------------------------------
# llama-cpp-python's high-level API vs our LlamaCppLLM on the same GGUF


@contextlib.contextmanager
def _model_defaults(extra_buffers: bool) -> Iterator[None]:
    """While `Llama` is constructed, its starting model params get `use_extra_bufts = extra_buffers`.

    `Llama` has no option for llama.cpp's weight-repacking buffers (AMX, AArch64), which our backend turns off on AMX
    CPUs (they die with SIGILL on this VM, runtimes/llamacpp.py). Used only in the baseline's own worker process,
    restored on exit, and only when the setting differs from llama.cpp's default.
    """
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def with_setting():
        params = original()
        params.use_extra_bufts = extra_buffers
        return params

    lib.llama_model_default_params = with_setting
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def open_high_level(gguf_path: str, n_ctx: int, n_threads: int, n_batch: int, flash_attn: bool | None,
                    extra_buffers: bool | None):
    """llama_cpp.Llama with the same context size, threads, batch, flash attention and repacking as our backend
    (None = llama-cpp-python's own default)."""
    from llama_cpp import Llama

    kwargs = dict(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                  n_batch=n_batch, n_ubatch=n_batch, verbose=False)
    if flash_attn is not None:
        kwargs["flash_attn"] = flash_attn
    if extra_buffers is None or extra_buffers:
        return Llama(**kwargs)
    with _model_defaults(extra_buffers):
        return Llama(**kwargs)


def high_level_run(llm, prompt: Sequence[int], new_tokens: int) -> dict:
    """Greedy `Llama.generate` (which never stops by itself: EOS is only checked by its callers) for G tokens."""
    llm.reset()  # forget the previous run: generate() would otherwise reuse the cached prompt and skip prefill
    times = []
    t0 = now()
    for token in llm.generate(list(prompt), temp=0.0, top_k=1, reset=True):
        times.append(now())
        if len(times) == new_tokens:
            break
    steps = np.diff(times)
    decode_s = times[-1] - times[0]
    return {"prefill_ms": ms(times[0] - t0), "itl_ms": [ms(s) for s in steps], "decode_ms": ms(decode_s),
            "decode_tok_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None}


def ours_text_run(llm, prompt: Sequence[int], new_tokens: int) -> dict:
    """The same work through our LLMBackend: prefill the prompt, then G-1 greedy decode steps."""
    from benchmarks.pipeline import GREEDY, decode_steps
    from sqllava_edge.generation import Sampler

    llm.release(0)
    sampler = Sampler(GREEDY)
    t0 = now()
    first = sampler(llm.prefill(0, tokens=list(prompt)))
    t1 = now()
    _, steps = decode_steps(llm, {0: first}, new_tokens - 1, {0: sampler})
    decode_s = now() - t1
    return {"prefill_ms": ms(t1 - t0), "itl_ms": [ms(s) for s in steps], "decode_ms": ms(decode_s),
            "decode_tok_s": (new_tokens - 1) / decode_s if new_tokens > 1 else None}
