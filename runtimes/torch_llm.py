"""The PyTorch LLM backend: transformers' LlamaForCausalLM with one KV cache per sequence (LLMBackend protocol).

Each sequence keeps its own per-layer key/value tensors, shaped (1, kv_heads, L, head_dim). Decoding several
sequences of equal length runs as one batch (their caches concatenated along the batch axis, then split back);
sequences of different lengths decode one after another. `fork` copies a cache, `truncate` slices it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from runtimes.base import Counters, LLMKind
from sqllava_edge.errors import PromptTooLongError

KV = list[tuple["torch.Tensor", "torch.Tensor"]]  # noqa: F821  per layer: (keys, values), each (B, kv_heads, L, head_dim)


class TorchLLM:
    name = LLMKind.TORCH.value

    def __init__(self, llm, n_ctx: int, n_threads: int | None = None):
        """llm: a transformers LlamaForCausalLM (already on its device, in its dtype); n_ctx: positions per sequence.

        n_threads: torch's intra-op threads. torch has one process-wide setting, so this changes it for the process.
        """
        import torch

        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        if n_threads is not None:
            torch.set_num_threads(n_threads)
        self.llm = llm.eval()
        self.n_ctx = n_ctx
        self.vocab_size = int(llm.config.vocab_size)
        self.counters = Counters()
        self._kv: dict[int, KV] = {}
        device = llm.get_input_embeddings().weight.device
        dtype = llm.get_input_embeddings().weight.dtype
        self.description = (f"torch {torch.__version__} {device.type} {str(dtype).removeprefix('torch.')}, "
                            f"{llm.config.num_hidden_layers} layers, n_ctx {n_ctx}")

    @property
    def device(self):
        return self.llm.get_input_embeddings().weight.device

    # ------------------------------------------------------------------------------------------------------------
    # LLMBackend

    def prefill(self, seq: int, tokens: Sequence[int] | None = None, embeds: np.ndarray | None = None) -> np.ndarray:
        import torch

        if (tokens is None) == (embeds is None):
            raise ValueError("prefill takes either tokens or embeds, not both and not neither")
        n = len(tokens) if tokens is not None else int(embeds.shape[0])
        if n == 0:
            raise ValueError("prefill needs at least one token or embedding row")
        self._check_room(seq, n)
        with torch.inference_mode():
            if tokens is not None:
                ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)  # (1, n)
                self._check_ids(ids)
                logits = self._forward([seq], input_ids=ids)
                self.counters.prefill_tokens += n
            else:
                if embeds.ndim != 2 or embeds.shape[1] != self.llm.config.hidden_size:
                    raise ValueError(f"embeds must be (n, {self.llm.config.hidden_size}), got {tuple(embeds.shape)}")
                dtype = self.llm.get_input_embeddings().weight.dtype
                rows = torch.as_tensor(np.ascontiguousarray(embeds), device=self.device).to(dtype)[None]  # (1, n, H)
                logits = self._forward([seq], inputs_embeds=rows)
                self.counters.prefill_embeds += n
        return logits[0]

    def decode(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        """One new token per sequence; sequences of equal length share one batched forward."""
        import torch

        groups: dict[int, list[int]] = {}
        for seq in tokens:
            self._check_room(seq, 1)
            groups.setdefault(self.length(seq), []).append(seq)
        out: dict[int, np.ndarray] = {}
        with torch.inference_mode():
            for seqs in groups.values():
                ids = torch.tensor([[tokens[s]] for s in seqs], dtype=torch.long, device=self.device)  # (B, 1)
                self._check_ids(ids)
                logits = self._forward(seqs, input_ids=ids)
                out.update(zip(seqs, logits))
                self.counters.decode_steps += 1
                self.counters.decode_tokens += len(seqs)
        return out

    def fork(self, src: int, dst: int) -> None:
        if src == dst:
            return
        self._kv[dst] = [(k.clone(), v.clone()) for k, v in self._kv.get(src, [])]

    def length(self, seq: int) -> int:
        kv = self._kv.get(seq)
        return int(kv[0][0].shape[2]) if kv else 0

    def truncate(self, seq: int, length: int) -> None:
        if length < 0:
            raise ValueError(f"truncate length must be >= 0, got {length}")
        if length == 0:
            self._kv.pop(seq, None)
        elif seq in self._kv and length < self.length(seq):
            self._kv[seq] = [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in self._kv[seq]]

    def release(self, seq: int) -> None:
        self._kv.pop(seq, None)

    def close(self) -> None:
        self._kv.clear()

    # ------------------------------------------------------------------------------------------------------------

    def _check_room(self, seq: int, n: int) -> None:
        have = self.length(seq)
        if have + n > self.n_ctx:
            raise PromptTooLongError(
                f"sequence {seq} would hold {have + n} positions but n_ctx is {self.n_ctx}; "
                "shorten the prompt or the chat history, lower max_new_tokens, or load with a larger n_ctx"
            )

    def _check_ids(self, ids) -> None:
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got {int(ids.min())}..{int(ids.max())}")

    def _forward(self, seqs: list[int], **inputs) -> np.ndarray:
        """Run the new positions of equal-length sequences `seqs` as one batch; store their grown caches."""
        import torch
        from transformers import DynamicCache

        past = [self._kv.get(s) for s in seqs]
        if past[0]:
            layers = [(torch.cat([p[i][0] for p in past]), torch.cat([p[i][1] for p in past]))  # (B, kvh, L, hd)
                      for i in range(len(past[0]))]
            cache = DynamicCache(layers)
        else:
            cache = DynamicCache()
        out = self.llm(**inputs, cache=cache, use_cache=True)  # transformers 5: `cache` (past_key_values until 5.40)
        batched = len(seqs) > 1  # copy rows out of a batch so no sequence pins the others' memory
        for b, seq in enumerate(seqs):
            self._kv[seq] = [(_row(layer.keys, b, batched), _row(layer.values, b, batched))
                             for layer in out.cache.layers]
        return out.logits[:, -1].float().cpu().numpy()  # (B, V)


def _row(t, b: int, copy: bool):
    row = t[b:b + 1]  # (1, kvh, L, hd)
    return row.clone() if copy else row
