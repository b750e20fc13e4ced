"""What every measurement feeds the backends: one fixed image, fixed prompt token ids, fixed token counts and seeds.

Random weights may emit EOS at any step, so decode loops here ignore EOS and always produce exactly `new_tokens`
tokens; prompts are random (seeded) token ids, since the ids do not change the work done per position.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 32  # P: text tokens after the image rows (the benchmark's "32-token question")
    new_tokens: int = 32  # G: tokens generated per answer, EOS ignored
    runs: int = 3  # timed runs per measurement (warm-up runs come on top and are discarded)
    warmup: int = 1
    seed: int = 0
    questions: int = 3  # self_question n
    vision_batch: int = 4  # the larger vision batch measured beside batch 1
    image_size: tuple[int, int] = (640, 480)  # (width, height) of the synthetic photo: preprocessing pads + resizes it

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "runs", "questions", "vision_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    def positions_needed(self, image_tokens: int) -> int:
        """KV positions of one sequence: image + prompt + answer, then a follow-up question and its first token."""
        return image_tokens + 2 * self.prompt_tokens + self.new_tokens + 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Workload":
        data = dict(data)
        data["image_size"] = tuple(data["image_size"])
        return cls(**data)


def synthetic_image(workload: Workload, index: int = 0):
    """A deterministic RGB photo-like image (smooth gradients + noise), different for each index."""
    from PIL import Image

    width, height = workload.image_size
    rng = np.random.default_rng(workload.seed * 1000 + index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200.0  # (H, W, 3)
    pixels = np.clip(base + rng.normal(0, 25, size=base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def prompt_ids(workload: Workload, vocab_size: int, stream: int = 0, count: int | None = None) -> list[int]:
    """`count` (default P) seeded token ids in [3, vocab): no BOS/EOS/UNK, so no backend treats them specially."""
    rng = np.random.default_rng([workload.seed, 7919, stream])
    return rng.integers(3, vocab_size, size=count or workload.prompt_tokens).tolist()
