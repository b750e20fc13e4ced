"""The plain PyTorch generation loop the runtime is checked against: HF forward passes with a KV cache on an
SQLLaVA module, no sequence pool, no scheduler, no stop strings (EOS stops and is not returned), the one `Sampler`."""
from __future__ import annotations

from typing import Iterator, Sequence

from sqllava_edge.generation import GenerationConfig, Sampler


def generate_tokens(model, prompt_ids: Sequence[int], config: GenerationConfig, pixel_values=None, image_embeds=None,
                    seed: int | None = None) -> Iterator[int]:
    """New token ids, one forward pass each; stops at EOS (not yielded) or max_new_tokens."""
    import torch

    sampler = Sampler(config, seed)
    eos = model.config.llm.eos_token_id
    with torch.inference_mode():
        ids = torch.as_tensor(list(prompt_ids), dtype=torch.long)
        out = model(ids, pixel_values=pixel_values, image_embeds=image_embeds, use_cache=True)
        cache, length = out.cache, out.attention_mask.shape[1]
        logits = out.logits[0, -1]
        for _ in range(config.max_new_tokens):
            token = sampler(logits.float().cpu().numpy())
            if token == eos:
                return
            yield token
            step = model.llm(
                input_ids=torch.tensor([[token]], device=model.device),
                attention_mask=torch.ones(1, length + 1, dtype=torch.long, device=model.device),
                cache=cache,  # transformers 5's name (past_key_values until 5.40)
                use_cache=True,
            )
            cache, length, logits = step.cache, length + 1, step.logits[0, -1]


def generate(model, prompt_ids: Sequence[int], config: GenerationConfig, pixel_values=None, image_embeds=None,
             seed: int | None = None) -> list[int]:
    return list(generate_tokens(model, prompt_ids, config, pixel_values, image_embeds, seed))
