"""The shared sampler and the PyTorch reference generation loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sqllava_edge.config import IMAGE_TOKEN_INDEX, get_preset
from sqllava_edge.generation import GenerationConfig, Sampler
from tests.reference import generate
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


BAD_CONFIGS = [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
               # each accepted before (NaN sampled garbage, "" never matched, "x" failed inside numpy)
               dict(temperature=float("nan")), dict(temperature=float("inf")), dict(top_p=float("nan")),
               dict(seed="x"), dict(seed=-1), dict(seed=1.5), dict(stop=("",)), dict(stop=("ok", 3)),
               dict(max_new_tokens=2.5), dict(temperature="0.5"), dict(top_k=True)]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=[str(b) for b in BAD_CONFIGS])
def test_bad_generation_config(bad):
    """A clear ValueError naming the option, never a TypeError from inside numpy."""
    with pytest.raises(ValueError, match=next(iter(bad))):
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


def test_kv_cache_goes_through_the_cache_argument():
    """transformers 5.40 removes `past_key_values`; generation, the torch runtime backend and training's
    shared-prefix pass hand the cache over as `cache` (transformers 5's name), never the old keyword."""
    from runtimes.torch_llm import TorchLLM
    from training.modeling import decoder_hidden

    model = SQLLaVA.from_config(get_preset("tiny"), seed=0).eval()
    calls = []
    for module in (model.llm, model.llm.model):
        forward = module.forward

        def spy(*args, _forward=forward, **kwargs):
            calls.append(sorted(kwargs))
            return _forward(*args, **kwargs)

        module.forward = spy
    generate(model, [1, 450, IMAGE_TOKEN_INDEX, 29871], GenerationConfig(max_new_tokens=3),
             pixel_values=torch.randn(1, 3, 112, 112))
    llm = TorchLLM(model.llm, 64)
    llm.prefill(0, tokens=[1, 450, 338])
    llm.decode({0: 29871})
    x = torch.randn(2, 12, model.config.llm.hidden_size)
    x[1, :4] = x[0, :4]
    with torch.no_grad():
        decoder_hidden(model.llm.model, x, torch.ones(2, 12, dtype=torch.long), prefix=4)
    assert calls and not [kw for kw in calls if "past_key_values" in kw]
    assert sum("cache" in kw for kw in calls) >= 3  # a decode step, the torch backend, the shared-prefix tail
