"""Shared by test_gguf.py and test_llamacpp.py: one tiny SQ-LLaVA with decisive logits, and its f32 GGUF written once.

Why the output head is fitted: with random weights the tiny LLM's logits are near-uniform (top-2 gap median 0.08
for a logit std of 0.32), below q8_0's own noise, so no quantization could keep its argmax (measured: q8_0 agreed
on 92% of positions). A trained LM is decisive. Instead of a slow training run, the output head gets a ridge-regression
fit (closed form, ~1 s) onto the next tokens of a few English sentences, added to its random weights; every other
weight stays random. The export's 64-token validation prompt is one of the sentences, as for a model that knows it.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

CORPUS = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A red car is parked in front of a tall white building with many windows.",
    "Two cats are sleeping on a soft blue sofa in the living room.",
    "The woman in the yellow dress is holding an umbrella in the rain.",
    "There are three apples and a banana on the wooden kitchen table.",
)


@functools.lru_cache(maxsize=1)
def tokenizer():
    from sqllava_edge.tokenizer import default_tokenizer

    return default_tokenizer()


@functools.lru_cache(maxsize=1)
def tiny_model():
    """SQLLaVA 'tiny' preset (random weights, seed 0) with the fitted output head described above; eval mode."""
    from export.gguf import VALIDATION_TEXT
    from sqllava_edge.config import get_preset
    from sqllava_edge.model import SQLLaVA

    model = SQLLaVA.from_config(get_preset("tiny"), seed=0).eval()
    fit_output_head(model.llm, [VALIDATION_TEXT, *CORPUS], ridge=1.0, gain=10.0)
    return model


def fit_output_head(llm, texts, ridge: float, gain: float) -> None:
    """lm_head += gain * W, W = argmin ||H W^T - onehot(next)||^2 + ridge ||W||^2 over the texts' positions."""
    tok = tokenizer()
    hidden, targets = [], []
    with torch.no_grad():
        for text in texts:
            ids = tok.encode(text, add_bos=True)
            states = llm.model(input_ids=torch.tensor([ids])).last_hidden_state[0, :-1]  # (n-1, H), after the final norm
            hidden.append(states)
            targets += ids[1:]
        h = torch.cat(hidden).double()  # (N, H)
        rhs = torch.zeros(h.shape[1], llm.config.vocab_size, dtype=torch.float64)  # (H, V) = H^T onehot
        rhs.index_add_(1, torch.tensor(targets), h.T)
        gram = h.T @ h + ridge * torch.eye(h.shape[1], dtype=torch.float64)  # (H, H)
        llm.lm_head.weight.add_(gain * torch.linalg.solve(gram, rhs).T.float())  # (V, H)


@functools.lru_cache(maxsize=1)
def f32_export() -> tuple[Path, dict]:
    """(bundle folder, artifact dict) of the tiny model's f32 GGUF, exported (and validated) once per process."""
    from export.gguf import export_gguf

    folder = Path(tempfile.mkdtemp(prefix="sqllava-gguf-test-"))
    atexit.register(shutil.rmtree, folder, True)
    (artifact,) = export_gguf(tiny_model(), tokenizer(), folder, quants=["f32"], log=lambda _: None)
    return folder, artifact


def f32_gguf() -> Path:
    folder, artifact = f32_export()
    return folder / artifact["path"]
