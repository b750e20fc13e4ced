"""A recording fake LLM backend for the sequence-pool tests (no model: what is prefilled, decoded, forked)."""
from __future__ import annotations

import numpy as np

from runtimes.base import Counters


class FakeLLM:
    """Counts what is prefilled; logits are a function of (sequence content) so sampling is deterministic."""

    name, description, vocab_size = "fake", "fake", 50

    def __init__(self, n_ctx: int):
        self.n_ctx, self.counters, self.seqs = n_ctx, Counters(), {}

    def _logits(self, seq):
        rng = np.random.default_rng(len(self.seqs[seq]) * 7919 + sum(self.seqs[seq]) % 1000)
        return rng.normal(size=self.vocab_size).astype(np.float32)

    def prefill(self, seq, tokens=None, embeds=None):
        if tokens is not None:
            self.counters.prefill_tokens += len(tokens)
            self.seqs.setdefault(seq, []).extend(tokens)
        else:
            self.counters.prefill_embeds += len(embeds)
            self.seqs.setdefault(seq, []).extend([-1] * len(embeds))
        assert len(self.seqs[seq]) <= self.n_ctx
        return self._logits(seq)

    def decode(self, tokens):
        self.counters.decode_steps += 1
        out = {}
        for seq, token in tokens.items():
            self.seqs[seq].append(token)
            out[seq] = self._logits(seq)
        return out

    def fork(self, src, dst):
        self.seqs[dst] = list(self.seqs.get(src, []))

    def length(self, seq):
        return len(self.seqs.get(seq, []))

    def truncate(self, seq, length):
        self.seqs[seq] = self.seqs.get(seq, [])[:length]

    def release(self, seq):
        self.seqs.pop(seq, None)

    def close(self):
        self.seqs.clear()
