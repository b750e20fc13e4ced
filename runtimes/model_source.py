"""Where a model comes from: a deployment bundle (manifest + artifacts, python -m export) or a training checkpoint
folder (the torch backends only), and the paths of its artifacts.

    source = ModelSource.open(path)        # BundleError / FileNotFoundError saying what the folder lacks
    source.is_bundle, source.config, source.manifest, source.artifact_path(artifact), source.torch_model(device)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runtimes.devices import DeviceInfo
from sqllava_edge.checkpoint import META_FILE
from sqllava_edge.config import ModelConfig
from sqllava_edge.errors import BackendUnavailableError, BundleError


@dataclass
class ModelSource:
    """A deployment bundle (manifest + artifacts) or a training checkpoint folder (torch backends only)."""

    folder: Path
    config: ModelConfig
    manifest: object | None = None  # sqllava_edge.bundle.Manifest for a bundle
    _torch: tuple | None = None  # (SQLLaVA, Tokenizer) once loaded
    quality_floor: object | None = None  # runtimes.quality.QualityFloor the automatic choice keeps; None = none

    @property
    def is_bundle(self) -> bool:
        return self.manifest is not None

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "ModelSource":
        from sqllava_edge.bundle import MANIFEST_FILE, read_manifest

        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist; pass a bundle folder (python -m export) or a checkpoint folder")
        if (folder / MANIFEST_FILE).is_file():
            manifest = read_manifest(folder, verify=verify)
            try:
                config = manifest.config
            except (TypeError, ValueError) as exc:
                raise BundleError(f"{folder}: the manifest's model config is invalid ({exc}); re-export the bundle") from None
            return cls(folder, config, manifest)
        if (folder / META_FILE).is_file():
            from sqllava_edge.deps import require

            require("torch", "train", f"{folder}, a training checkpoint (the torch backends; a device runs its "
                    "exported bundle),")
            from sqllava_edge.checkpoint import read_meta

            return cls(folder, ModelConfig.from_dict(read_meta(folder)["config"]))
        raise BundleError(f"{folder} is neither a bundle (no manifest.json) nor a training checkpoint "
                          "(no sqllava_edge.json); export one with: python -m export CHECKPOINT --out BUNDLE")

    def torch_model(self, device: DeviceInfo):
        """(SQLLaVA, Tokenizer) from the checkpoint, loaded once and shared by the torch backends."""
        if self.is_bundle:
            source = self.manifest.provenance.get("source_checkpoint")
            hint = f" (this bundle was exported from {source})" if source else ""
            raise BackendUnavailableError(f"the torch backends need the training checkpoint folder, not a bundle{hint}; "
                                          "pass the checkpoint path to Assistant.load")
        if self._torch is None:
            from sqllava_edge.checkpoint import load_checkpoint

            self._torch = load_checkpoint(self.folder, merge_lora=True, device="cuda" if device.kind == "cuda" else "cpu")
        return self._torch

    def artifact_path(self, artifact) -> Path:
        return self.manifest.resolve(self.folder, artifact)
