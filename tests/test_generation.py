"""The shared sampler and the PyTorch reference generation loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sqllava_edge.config import IMAGE_TOKEN_INDEX, get_preset
from sqllava_edge.generation import GenerationConfig, Sampler, generate
from sqllava_edge.model import SQLLaVA


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9])
    assert Sampler(GenerationConfig())(logits) == 1


def test_top_k_1_is_greedy_and_seeds_reproduce():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000)
    assert Sampler(GenerationConfig(temperature=1.0, top_k=1, seed=3))(logits) == int(np.argmax(logits))
    cfg = GenerationConfig(temperature=1.2, top_k=300, top_p=0.95)
    a = [Sampler(cfg, seed=7)(logits) for _ in range(3)]
    b = [Sampler(cfg, seed=7)(logits) for _ in range(3)]
    assert a == b


def test_sampling_distribution_respects_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(GenerationConfig(temperature=1.0, top_p=0.8, seed=0))
    counts = np.bincount([sampler(logits) for _ in range(4000)], minlength=4)
    assert counts[2] == 0 and counts[3] == 0  # outside the 0.8 nucleus {0.5, 0.3}
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)])
def test_bad_generation_config(bad):
    with pytest.raises(ValueError):
        GenerationConfig(**bad)


def test_kv_cache_generation_equals_full_recompute():
    model = SQLLaVA.from_config(get_preset("tiny"), seed=0).eval()
    px = torch.randn(1, 3, 112, 112)
    prompt = [1, 450, IMAGE_TOKEN_INDEX, 29871, 13, 5618, 338]
    cfg = GenerationConfig(max_new_tokens=12)
    got = generate(model, prompt, cfg, pixel_values=px)
    # no cache: re-run the whole sequence for every token
    expected, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(12):
            token = int(model(torch.tensor(ids), pixel_values=px).logits[0, -1].argmax())
            if token == model.config.llm.eos_token_id:
                break
            expected.append(token)
            ids.append(token)
    assert got == expected and len(got) > 0
