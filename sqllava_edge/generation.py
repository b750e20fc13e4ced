"""Token sampling shared by every backend: the generation options and the one `Sampler`.

One `Sampler` turns a logits vector into a token for every backend (numpy, float32), so two backends that produce
the same logits produce the same tokens, greedy or sampled with the same seed. docs/spec.md 5 gives the defaults per
task. Generation itself (prefill, the decode step, stop strings, freeing sequences) is `runtimes.scheduler`'s step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


MAX_TOP_LOGPROBS = 20  # as OpenAI allows
# Below this temperature sampling is its greedy limit: logits / T would overflow float64 only for logit ranges above
# 1e302 here, but a subnormal T (5e-324) overflows for any range and gave NaN probabilities.
GREEDY_BELOW = 1e-6


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)  # extra stop strings; EOS always stops
    # A compiled schema (sqllava_edge.structured.Grammar): every token is masked to keep the answer valid JSON.
    grammar: Any = field(default=None, compare=False)
    logprobs: int | None = None  # None: off; k >= 0: record each chosen token's logprob and the k most likely

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        check_seed(self.seed)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings (an empty one would never match), got {self.stop!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be None or an int in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def replace(self, **changes) -> "GenerationConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A real, finite number (NaN would sample garbage: every comparison with it is False)."""
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def check_seed(seed, name: str = "seed") -> int | None:
    """A sampling seed: None (fresh randomness) or an int >= 0 (numpy's generators take no other)."""
    if seed is None:
        return None
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"{name} must be an int >= 0 or None, got {seed!r}")
    return int(seed)


# docs/spec.md 5.1 / 5.3: greedy answers and descriptions; self-questions sampled at T 1.2, top-k 300, top-p 0.95, 300 tokens.
TASK_DEFAULTS: dict[str, GenerationConfig] = {
    "answer": GenerationConfig(max_new_tokens=512),
    "describe": GenerationConfig(max_new_tokens=512),
    "self_question": GenerationConfig(max_new_tokens=300, temperature=1.2, top_k=300, top_p=0.95),
}


class Sampler:
    """Logits (1-D, any float array-like) -> token id. Temperature, then top-k, then top-p (HF warper order).

    With `config.grammar` each Sampler holds its own parser state (one Sampler per sequence): tokens the schema does
    not allow next are masked out before choosing, greedy or sampled, and the chosen token advances the state.
    With `config.logprobs` set, `last_logprobs` holds (logprob, top alternatives) of the token just chosen, from the
    model's distribution: log-softmax of the logits as given, before temperature, top-k / top-p and the mask.
    """

    def __init__(self, config: GenerationConfig, seed: int | None = None):
        self.config = config
        self.rng = np.random.default_rng(config.seed if seed is None else seed)
        self.constraint = config.grammar.constraint() if config.grammar is not None else None
        self.last_logprobs: tuple[float, tuple[tuple[int, float], ...]] | None = None

    def __call__(self, logits) -> int:
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if self.constraint is None:
            token = self._choose(logits)
        else:
            allowed = self.constraint.allowed()
            if not allowed.any():
                raise RuntimeError("the schema allows no next token")
            masked = np.where(allowed, logits, -np.inf)
            token = self._choose(masked)
            if not allowed[token]:  # float round-off at the very end of the cumulative sum
                token = int(np.argmax(masked))
            self.constraint.advance(token)
        if self.config.logprobs is not None:
            from sqllava_edge.structured import token_logprobs

            self.last_logprobs = token_logprobs(logits, token, self.config.logprobs)
        return token

    def _choose(self, logits: np.ndarray) -> int:
        if self.config.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.config.temperature
        k = self.config.top_k
        if 0 < k < scaled.size:
            kth = np.partition(scaled, -k)[-k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if self.config.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            cut = int(np.searchsorted(cumulative, self.config.top_p) + 1)
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), side="right").clip(0, probs.size - 1))
