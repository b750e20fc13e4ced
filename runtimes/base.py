"""The two backend protocols every runtime implements, and the counters the tests and benchmarks read.

Vision: pixels -> image embeddings. LLM: a KV cache holding one or more sequences that can be extended with token
ids or with embedding rows, forked (a shared prefix copied to another sequence), truncated, and decoded in a batch.
Logits leave a backend as float32 numpy vectors so one `sqllava_edge.generation.Sampler` serves every backend.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np


class VisionKind(str, enum.Enum):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class LLMKind(str, enum.Enum):
    TORCH = "torch"
    LLAMA_CPP = "llama.cpp"


@dataclass
class Counters:
    """Work actually done, for tests that assert caching by counting rather than timing."""

    vision_encodes: int = 0  # images run through the vision backend
    prefill_tokens: int = 0  # text positions prefilled
    prefill_embeds: int = 0  # embedding rows prefilled (image tokens)
    decode_steps: int = 0  # batched decode calls
    decode_tokens: int = 0  # tokens decoded over all sequences

    def snapshot(self) -> dict[str, int]:
        return dict(self.__dict__)


@runtime_checkable
class VisionBackend(Protocol):
    name: str
    description: str  # e.g. "onnxruntime 1.31 CPUExecutionProvider, vision.int8.onnx"

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, T, H) float32 image embeddings."""

    def close(self) -> None: ...


@runtime_checkable
class LLMBackend(Protocol):
    name: str
    description: str
    n_ctx: int
    vocab_size: int
    counters: Counters

    def prefill(self, seq: int, tokens: Sequence[int] | None = None, embeds: np.ndarray | None = None) -> np.ndarray:
        """Append token ids OR embedding rows (n, H) to sequence `seq` at its current length.

        Returns the float32 logits (V,) of the last appended position. Raises PromptTooLongError if n_ctx would be
        exceeded. Long inputs are split into chunks internally (llama.cpp's n_batch limit).
        """

    def decode(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        """Append one token to each of several sequences in one batch; returns {seq: logits (V,)}."""

    def fork(self, src: int, dst: int) -> None:
        """Make `dst` a copy of `src` (KV cache included); `dst`'s previous content is dropped."""

    def length(self, seq: int) -> int:
        """Number of positions in sequence `seq` (0 if unknown)."""

    def truncate(self, seq: int, length: int) -> None:
        """Forget positions >= length of sequence `seq`."""

    def release(self, seq: int) -> None:
        """Drop sequence `seq` entirely."""

    def close(self) -> None: ...
