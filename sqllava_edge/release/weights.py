"""Reading and writing weight files safely and one shard at a time (used by sqllava_edge.release.convert).

Reading: safetensors through `safe_open` (tensors read one at a time); pickled `.bin` files only through
`torch.load(weights_only=True)`, memory-mapped when the file is in the zip format. A pickle that asks to run code is
refused with a CheckpointError before anything in it runs.
Writing: `ShardWriter` checks every tensor against the names and shapes the target module expects, casts it, and
writes output shards as they fill, so a conversion holds about one input shard plus one output shard in memory.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Iterator

import torch

from sqllava_edge.errors import CheckpointError
from sqllava_edge.release.names import WEIGHT_STEMS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pickle(path: Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded with torch.load(weights_only=True): never runs code stored in the file."""
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only" in text.lower() or "weights_only" in text.lower():
            found = re.search(r"(Unsupported global: GLOBAL [\w.]+|Unsupported operand \S+)", text)
            detail = found.group(1).strip(" .") if found else text.splitlines()[0][:200]
            raise CheckpointError(
                f"refusing to load {path}: the pickle asks to run code or build objects that are not tensors "
                f"({detail}); nothing in it was run. Only plain tensor state dicts are accepted; if you trust the file, "
                "re-save its tensors as safetensors"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch weights file ({exc}); re-download it") from None
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):  # legacy (pre-zip) torch.save format cannot be memory-mapped
            return load_pickle(path, mmap=False)
        raise CheckpointError(f"{path} is corrupt or truncated ({str(exc).splitlines()[0]}); re-download it") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return state


class TensorFile:
    """One weights file, read lazily: `keys()`, `shape(key)`, `get(key)`. Use as a context manager."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"missing weights file {self.path}")
        self._safe = None
        self._state: dict[str, torch.Tensor] | None = None
        if self.path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                self._safe = safe_open(str(self.path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{self.path} is not a readable safetensors file ({exc}); re-download it") from None
        else:
            self._state = load_pickle(self.path)

    def keys(self) -> list[str]:
        return list(self._safe.keys()) if self._safe is not None else list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._safe is not None:
            return tuple(self._safe.get_slice(key).get_shape())
        return tuple(self._state[key].shape)

    def get(self, key: str) -> torch.Tensor:
        return self._safe.get_tensor(key) if self._safe is not None else self._state[key]

    def close(self) -> None:
        self._safe, self._state = None, None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_weights(folder: Path, stems: tuple[str, ...] = WEIGHT_STEMS) -> list[Path]:
    """The weight files of an HF-style folder, in shard order: safetensors (single or indexed) first, then pickles."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"folder {folder} does not exist")
    for suffix in (".safetensors", ".bin"):
        for stem in stems:
            index = folder / f"{stem}{suffix}.index.json"
            if index.is_file():
                return _shards_from_index(index)
            single = folder / f"{stem}{suffix}"
            if single.is_file():
                return [single]
    names = [f"{s}{x}" for x in (".safetensors", ".bin") for s in stems]
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(names)} (or their .index.json for shards)")


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index} is not a valid weights index ({exc!r}); re-download it") from None
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} lists shard(s) that are missing: {', '.join(missing)}; the download is incomplete")
    return [index.parent / s for s in shards]


def iter_tensors(paths: list[Path]) -> Iterator[tuple[int, str, TensorFile]]:
    """(file number, key, open file) for every tensor, one file open at a time."""
    for number, path in enumerate(paths):
        with TensorFile(path) as handle:
            for key in handle.keys():
                yield number, key, handle


def expected_shapes(module_factory) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a module's state dict, built on the meta device (no memory)."""
    with torch.device("meta"):
        module = module_factory()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


class ShardWriter:
    """Collects one part's tensors (e.g. the LLM), checks each against the expected names and shapes, and writes HF
    shards (`model-0000i-of-0000n.safetensors` or `pytorch_model-0000i-of-0000n.bin`) + index as they fill.

    folder=None only checks (used when a base folder is referenced instead of copied). Call `flush()` at the end of
    each input shard so that at most one input shard's worth of tensors is held at a time.
    """

    def __init__(self, folder: Path | None, expected: dict[str, tuple[int, ...]], dtype: torch.dtype | None, what: str,
                 max_shard_bytes: int = 2 << 30, fmt: str = "safetensors"):
        if fmt not in ("safetensors", "bin"):
            raise ValueError(f"fmt must be safetensors or bin, got {fmt!r}")
        self.folder, self.expected, self.dtype, self.what = folder, expected, dtype, what
        self.max_shard_bytes, self.fmt = max_shard_bytes, fmt
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.seen: set[str] = set()
        self.total_bytes = 0
        self.source_dtypes: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor, source: str) -> None:
        want = self.expected.get(key)
        if want is None:
            raise CheckpointError(f"{source}: tensor {key} is not part of a {self.what} with this config; wrong folder?")
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{source}: {self.what} tensor {key} has shape {tuple(tensor.shape)}, the config needs {want}")
        if key in self.seen:
            raise CheckpointError(f"{source}: {self.what} tensor {key} appears twice")
        self.seen.add(key)
        self.source_dtypes.add(str(tensor.dtype).replace("torch.", ""))
        if self.folder is None:
            return
        tensor = tensor.to(self.dtype) if self.dtype is not None else tensor
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        path = Path(self.folder) / f"part-{len(self.shards):05d}.{self.fmt}"
        if self.fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(self.pending, str(path), metadata={"format": "pt"})
        else:
            torch.save(self.pending, path)
        self.shards.append(sorted(self.pending))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> int:
        """Write the last shard, rename the shards to HF names, write the index; -> number of tensors seen."""
        self.flush()
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            raise CheckpointError(f"the {self.what} weights lack {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}: "
                                  "the folder is incomplete or holds another architecture")
        if self.folder is None:
            return len(self.seen)
        stem, ext = ("model", ".safetensors") if self.fmt == "safetensors" else ("pytorch_model", ".bin")
        count, weight_map = len(self.shards), {}
        for i, keys in enumerate(self.shards):
            final = f"{stem}{ext}" if count == 1 else f"{stem}-{i + 1:05d}-of-{count:05d}{ext}"
            (Path(self.folder) / f"part-{i:05d}.{self.fmt}").rename(Path(self.folder) / final)
            weight_map.update({k: final for k in keys})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (Path(self.folder) / f"{stem}{ext}.index.json").write_text(json.dumps(index, indent=2))
        return len(self.seen)
