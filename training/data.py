"""Training data: a lazy dataset over LLaVA JSON + an image folder (docs/spec.md 4.5-4.6), the collator, and a sampler whose
position (epoch, step) can be saved and restored.

* Paths: an image path must stay inside the image folder. Absolute paths and ".." escapes are refused when the JSON
  is loaded (ValueError naming the samples); a symlink that resolves outside the folder is refused at read time.
* A missing or corrupt image does not crash the run: the sample is skipped and counted (the reference crashes,
  docs/spec.md 8.17); the first few are reported with a warning, the totals go to the metrics log.
* Self-questioning (docs/spec.md 3.3) is re-drawn on every read: the sampler hands out keys (index, epoch), and the
  conversion of sample i in epoch e uses its own generator seeded by (seed, e, i). Every epoch reads a sample once,
  so each read draws anew, and a resumed or multi-process run draws exactly what an uninterrupted run draws.
* Text ids longer than max_length are truncated (docs/spec.md 1.5); a sample left with no trained token is skipped and
  counted, never silently trained with an all-masked loss (docs/spec.md 8.8).
"""
from __future__ import annotations

import json
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from sqllava_edge.config import IMAGE_PLACEHOLDER, VisionConfig
from sqllava_edge.errors import ImageError, PromptTooLongError

MAX_REPORTED_WARNINGS = 5  # per dataset and kind; later ones are only counted


class SkippedSampleWarning(UserWarning):
    """A training sample was skipped (missing/corrupt image, path outside the image folder, nothing to train)."""


@dataclass
class Example:
    index: int
    input_ids: torch.Tensor  # (n,) long, one IMAGE_TOKEN_INDEX when there is an image
    labels: torch.Tensor  # (n,) long, IGNORE_INDEX where no loss
    pixel_values: torch.Tensor | None  # (3, S, S) float32
    n_trainable: int
    truncated: bool
    sq_turns: int  # human turns converted to VUSER in this read
    sq_eligible: int  # human turns that could have been converted (docs/spec.md 3.3: not the first, image samples only)


@dataclass
class Skipped:
    index: int
    reason: str  # "missing_image" | "corrupt_image" | "path_outside_folder" | "all_masked" | "image_cut"
    detail: str


@dataclass
class Batch:
    """What the training step consumes. Rows are unpadded (model.forward pads them after the image splice)."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    pixel_values: torch.Tensor | None  # (N_images, 3, S, S), images in row order
    stats: Counter = field(default_factory=Counter)  # samples, truncated, sq_turns, sq_eligible, skipped_<reason>

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trainable(self) -> int:
        return sum(int((lab != -100).sum()) for lab in self.labels)

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        pixels = self.pixel_values.pin_memory() if self.pixel_values is not None else None
        return Batch([t.pin_memory() for t in self.input_ids], [t.pin_memory() for t in self.labels], pixels, self.stats)

    def to(self, device: torch.device | str) -> "Batch":
        move = dict(device=device, non_blocking=True)
        pixels = self.pixel_values.to(**move) if self.pixel_values is not None else None
        return Batch([t.to(**move) for t in self.input_ids], [t.to(**move) for t in self.labels], pixels, self.stats)


def load_samples(json_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a LLaVA JSON list and check each sample's shape and image path (docs/spec.md 4.5)."""
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist; make one with `python -m training.synthetic OUT`")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} must hold a non-empty JSON list of samples {{'image', 'conversations'}}")
    escaping = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("conversations"), list):
            raise ValueError(f"{path}: sample {i} has no 'conversations' list (LLaVA format, docs/spec.md 4.5)")
        image = row.get("image")
        if image is not None and not _stays_inside(image):
            escaping.append(f"{i} ({image!r})")
    if escaping:
        raise ValueError(f"{path}: image paths must be relative and stay inside the image folder; refused samples "
                         f"{', '.join(escaping[:10])}{' ...' if len(escaping) > 10 else ''}. Fix or drop them.")
    return rows


def _stays_inside(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return False
    normal = os.path.normpath(rel)
    return normal != ".." and not normal.startswith(".." + os.sep) and ":" not in Path(rel).parts[0]


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA JSON samples, read lazily: the image is opened and the conversation tokenized on each read.

    template "plain" gives stage-1 samples (docs/spec.md 3.5); "v1_sq" with sq_r > 0 converts later human turns to VUSER
    (docs/spec.md 3.3). Keys are an index (each read draws SQ anew from a per-dataset counter) or (index, epoch) from
    `StepSampler` (deterministic per epoch).
    """

    def __init__(self, json_path: str | os.PathLike, image_folder: str | os.PathLike, tokenizer, vision: VisionConfig,
                 *, template: str, image_mode: str, sq_r: float = 0.0, max_length: int = 2048, seed: int = 0):
        from sqllava_edge.conversation import get_template

        if not 0.0 <= sq_r <= 1.0:
            raise ValueError(f"sq_r must be in [0, 1], got {sq_r}")
        if sq_r > 0 and "vuser" not in get_template(template).roles:
            raise ValueError(f"template {template!r} has no VUSER role; self-questioning (sq_r > 0) needs 'v1_sq'")
        if max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {max_length}")
        self.rows = load_samples(json_path)
        self.image_folder = Path(image_folder)
        if any("image" in r for r in self.rows) and not self.image_folder.is_dir():
            raise FileNotFoundError(f"image folder {self.image_folder} does not exist (pass --image-folder)")
        self.root = self.image_folder.resolve()
        self.tokenizer, self.vision = tokenizer, vision
        self.template, self.image_mode, self.sq_r = template, image_mode, sq_r
        self.max_length, self.seed = max_length, seed
        self._reads: Counter = Counter()
        self._warned: Counter = Counter()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> Example | Skipped:
        if isinstance(key, tuple):
            index, epoch = key
        else:
            index, epoch = key, None
        row = self.rows[index]
        if epoch is None:  # plain indexing: a fresh draw each time this process reads the sample
            self._reads[index] += 1
            rng = random.Random(f"{self.seed}/read/{index}/{self._reads[index]}")
        else:
            rng = random.Random(f"{self.seed}/{epoch}/{index}")
        has_image = "image" in row
        pixels = None
        if has_image:
            pixels = self._read_image(index, row["image"])
            if isinstance(pixels, Skipped):
                return pixels
        return self._tokenize(index, row, has_image, pixels, rng)

    def _read_image(self, index: int, rel: str) -> torch.Tensor | Skipped:
        from sqllava_edge.image import preprocess

        path = self.image_folder / rel
        if not path.resolve().is_relative_to(self.root):
            return self._skip(index, "path_outside_folder", f"{rel} resolves outside {self.root}")
        if not path.is_file():
            return self._skip(index, "missing_image", str(path))
        try:
            return torch.from_numpy(preprocess(path, self.vision, self.image_mode))  # (3, S, S)
        except ImageError as exc:
            return self._skip(index, "corrupt_image", str(exc))

    def _tokenize(self, index: int, row: dict, has_image: bool, pixels, rng: random.Random) -> Example | Skipped:
        from sqllava_edge.conversation import sq_convert, to_turns, tokenize_conversation

        conv = row["conversations"]
        if has_image and not any(IMAGE_PLACEHOLDER in t.get("value", "") for t in conv if isinstance(t, dict)):
            conv = [{**conv[0], "value": IMAGE_PLACEHOLDER + "\n" + conv[0]["value"]}, *conv[1:]]  # LLaVA data may omit it
        try:
            if self.sq_r > 0:
                turns = sq_convert(conv, self.sq_r, rng, has_image)
            else:
                turns = to_turns(conv, has_image)
            if self.template == "plain":  # docs/spec.md 3.5: first human/gpt pair only, the instruction is dropped
                turns = turns[:2]
            tok = tokenize_conversation(self.tokenizer, self.template, turns, has_image, self.max_length)
        except PromptTooLongError as exc:
            return self._skip(index, "image_cut", str(exc))
        except ValueError as exc:
            return self._skip(index, "bad_conversation", str(exc))
        if tok.n_trainable == 0:
            return self._skip(index, "all_masked", f"no trained token left (truncated={tok.truncated})")
        eligible = sum(t.role != "assistant" for t in turns[1:]) if has_image and self.sq_r > 0 else 0
        return Example(index, torch.tensor(tok.ids, dtype=torch.long), torch.tensor(tok.labels, dtype=torch.long),
                       pixels, tok.n_trainable, tok.truncated, sum(t.role == "vuser" for t in turns), eligible)

    def _skip(self, index: int, reason: str, detail: str) -> Skipped:
        self._warned[reason] += 1
        if self._warned[reason] <= MAX_REPORTED_WARNINGS:
            more = " (further ones are only counted)" if self._warned[reason] == MAX_REPORTED_WARNINGS else ""
            warnings.warn(f"skipping sample {index} ({reason}): {detail}{more}", SkippedSampleWarning, stacklevel=3)
        return Skipped(index, reason, detail)


def collate(items: Sequence[Example | Skipped]) -> Batch:
    """Drop skipped samples (counting them), keep rows unpadded, stack the images in row order."""
    stats: Counter = Counter()
    kept = []
    for item in items:
        if isinstance(item, Skipped):
            stats[f"skipped_{item.reason}"] += 1
        else:
            kept.append(item)
    images = [e.pixel_values for e in kept if e.pixel_values is not None]
    stats.update(samples=len(kept), truncated=sum(e.truncated for e in kept), sq_turns=sum(e.sq_turns for e in kept),
                 sq_eligible=sum(e.sq_eligible for e in kept))
    return Batch([e.input_ids for e in kept], [e.labels for e in kept], torch.stack(images) if images else None, stats)


class StepSampler(torch.utils.data.Sampler):
    """Keys (index, epoch) for one rank, in micro-batch order, starting at a saved (epoch, step) position.

    Every epoch is a permutation seeded by (seed, epoch). Optimizer step s of an epoch uses the global batch
    perm[s*G:(s+1)*G] (G = micro_batch * grad_accum * world_size, remainder dropped); rank r takes its contiguous
    share of it, split into grad_accum micro-batches. So the samples of each step, and their SQ draws, do not depend
    on how many processes share the step, and resuming at (epoch, step) continues the same sequence.
    """

    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int = 1, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.num_samples, self.micro_batch, self.grad_accum = num_samples, micro_batch, grad_accum
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.global_batch = micro_batch * grad_accum * world_size
        if self.num_samples < self.global_batch:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {self.global_batch} "
                             f"(micro batch {micro_batch} x grad accum {grad_accum} x {world_size} processes)")
        self.steps_per_epoch = num_samples // self.global_batch
        self.epoch, self.step = 0, 0

    def set_position(self, epoch: int, step: int) -> None:
        """Continue at optimizer step `step` of `epoch` (a step count past the epoch's end rolls over)."""
        epoch, step = epoch + step // self.steps_per_epoch, step % self.steps_per_epoch
        self.epoch, self.step = epoch, step

    def position_after(self, steps_done: int) -> dict[str, int]:
        """The (epoch, step) after `steps_done` more optimizer steps from the start position."""
        total = self.epoch * self.steps_per_epoch + self.step + steps_done
        return {"epoch": total // self.steps_per_epoch, "step": total % self.steps_per_epoch}

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, step = self.epoch, self.step
        share = self.micro_batch * self.grad_accum  # this rank's samples per optimizer step
        while True:  # endless: the training loop decides when to stop
            perm = self.permutation(epoch)
            for s in range(step, self.steps_per_epoch):
                start = s * self.global_batch + self.rank * share
                for index in perm[start:start + share]:
                    yield index, epoch
            epoch, step = epoch + 1, 0

    def __len__(self) -> int:  # one epoch from the current position, this rank's share
        return (self.steps_per_epoch - self.step) * self.micro_batch * self.grad_accum


def make_loader(dataset: ConversationDataset, sampler: StepSampler, *, num_workers: int = 0, pin_memory: bool = False):
    # Its own generator: creating the iterator must not consume the global RNG that dropout draws from (resume).
    generator = torch.Generator().manual_seed(sampler.seed)
    return torch.utils.data.DataLoader(dataset, batch_size=sampler.micro_batch, sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=pin_memory, generator=generator,
                                       persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)
