"""The deployment bundle's manifest: what every artifact is, how it was checked, and how to verify it.

Layout and schema: docs/DESIGN.md "Deployment bundle". Loaders read the manifest's fields (kind, precision, path),
never file or folder names. Paths inside the manifest are relative, POSIX-style, and must stay inside the bundle.

    manifest = read_manifest("bundle/")                      # BundleError if missing, malformed or tampered with
    onnx = manifest.find("vision_onnx", "int8")              # Artifact | None
    path = manifest.resolve("bundle/", onnx)                 # absolute path of its main file
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from sqllava_edge.errors import BundleError
from sqllava_edge.fileutil import atomic_write, sha256_file

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

# Artifact kinds and the precisions each may carry (DESIGN.md). Unknown values are a schema error.
KINDS: dict[str, tuple[str, ...]] = {
    "vision_onnx": ("fp32", "fp16", "int8"),
    "llm_gguf": ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_k_s", "q4_0", "iq4_nl"),
    "tensorrt_engine": ("fp32", "fp16", "int8"),
    "tokenizer": ("",),
}


@dataclass
class Artifact:
    kind: str  # one of KINDS
    path: str  # main file (or folder, for the tokenizer), relative to the bundle
    files: list[str]  # every file belonging to it (e.g. an .onnx and its .onnx.data), relative to the bundle
    precision: str  # one of KINDS[kind]; "" for the tokenizer
    size: int  # total bytes of `files`
    sha256: dict[str, str]  # file -> hex digest, for every entry of `files`
    validation: dict[str, Any] = field(default_factory=dict)  # numbers measured right after export
    target: dict[str, Any] | None = None  # tensorrt only: device_key, gpu, compute_capability, tensorrt, jetson
    inputs_key: str = ""  # sha256 over what produced it (source weights, options, tool versions): re-export reuse

    @classmethod
    def from_files(cls, bundle: str | os.PathLike, kind: str, path: str, files: Iterable[str], precision: str,
                   validation: dict[str, Any] | None = None, target: dict[str, Any] | None = None,
                   inputs_key: str = "") -> "Artifact":
        """Describe files already written inside `bundle`: measures their sizes and sha256 digests."""
        bundle = Path(bundle)
        files = sorted(set(files))
        digests = {name: sha256_file(bundle / name) for name in files}
        size = sum((bundle / name).stat().st_size for name in files)
        artifact = cls(kind, path, files, precision, size, digests, dict(validation or {}), target, inputs_key)
        artifact.check_schema()
        return artifact

    def check_schema(self) -> None:
        if self.kind not in KINDS:
            raise BundleError(f"artifact {self.path!r}: unknown kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.precision not in KINDS[self.kind]:
            raise BundleError(f"artifact {self.path!r}: precision {self.precision!r} is not valid for {self.kind} "
                              f"(valid: {', '.join(p or '(none)' for p in KINDS[self.kind])})")
        for name in [self.path, *self.files]:
            _check_relative(name)
        if set(self.sha256) != set(self.files):
            raise BundleError(f"artifact {self.path!r}: sha256 must list exactly its files {self.files}")

    def verify(self, bundle: str | os.PathLike) -> None:
        """Raise BundleError if any file is missing or its sha256 differs from the manifest."""
        bundle = Path(bundle)
        for name in self.files:
            file = bundle / name
            if not file.is_file():
                raise BundleError(f"{bundle}: {self.kind} file {name} is missing; re-export the bundle")
            digest = sha256_file(file)
            if digest != self.sha256[name]:
                raise BundleError(f"{bundle}: {name} was modified or corrupted (sha256 {digest[:12]}..., manifest "
                                  f"says {self.sha256[name][:12]}...); re-export the bundle")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["target"] is None:
            del data["target"]
        return data


@dataclass
class Manifest:
    model: dict[str, Any]  # ModelConfig.to_dict()
    template: str  # conversation template name (sqllava_edge.conversation.TEMPLATES)
    preprocessing: dict[str, Any]  # {"mode", "image_size", "mean", "std", "resample"}
    special_tokens: dict[str, int]  # {"bos", "eos", "pad", "unk"}
    num_image_tokens: int  # T: rows of image_embeds per image
    embed_dim: int  # H: LLM hidden size = width of image_embeds
    artifacts: list[Artifact] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)  # source_checkpoint, source_sha256, tools, created
    schema_version: int = SCHEMA_VERSION

    @property
    def config(self):
        """The ModelConfig the bundle was exported from."""
        from sqllava_edge.config import ModelConfig

        return ModelConfig.from_dict(self.model)

    def find(self, kind: str, precision: str | None = None) -> Artifact | None:
        """The first artifact of `kind` (and `precision`, if given), or None."""
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
        for artifact in self.artifacts:
            if artifact.kind == kind and (precision is None or artifact.precision == precision):
                return artifact
        return None

    def find_all(self, kind: str) -> list[Artifact]:
        return [a for a in self.artifacts if a.kind == kind]

    def add(self, artifact: Artifact) -> list[Artifact]:
        """Add an artifact, replacing one of the same kind, precision and path, or (a TensorRT engine) of the same
        kind, precision, target device key and TensorRT version: a bundle keeps one engine per device and TensorRT,
        whatever its file is called. Returns the replaced ones."""
        def device(a: Artifact):
            target = a.target or {}
            return None if target.get("device_key") is None else (target["device_key"], target.get("tensorrt"))

        def same(a: Artifact) -> bool:
            if (a.kind, a.precision) != (artifact.kind, artifact.precision):
                return False
            return a.path == artifact.path or (device(artifact) is not None and device(a) == device(artifact))

        replaced = [a for a in self.artifacts if same(a)]
        self.artifacts = [a for a in self.artifacts if not same(a)] + [artifact]
        return replaced

    @staticmethod
    def resolve(bundle: str | os.PathLike, artifact: Artifact) -> Path:
        return Path(bundle) / artifact.path

    def verify(self, bundle: str | os.PathLike) -> None:
        for artifact in self.artifacts:
            artifact.verify(bundle)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["artifacts"] = [a.to_dict() for a in self.artifacts]
        order = ["schema_version", "model", "template", "preprocessing", "special_tokens", "num_image_tokens",
                 "embed_dim", "artifacts", "provenance"]
        return {key: data[key] for key in order}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(f"{source}: schema_version {version!r} is not supported (this sqllava-edge reads "
                              f"{SCHEMA_VERSION}); re-export the bundle with this version")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"artifacts", "provenance"})
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise BundleError(f"{source}: malformed manifest (missing {missing}, unknown {unknown})")
        try:
            artifacts = [_artifact_from_dict(a) for a in data.get("artifacts", [])]
        except (TypeError, KeyError) as exc:
            raise BundleError(f"{source}: malformed artifact entry ({exc})") from None
        for artifact in artifacts:
            artifact.check_schema()
        fields = {k: v for k, v in data.items() if k != "artifacts"}
        return cls(**fields, artifacts=artifacts)


def _artifact_from_dict(data: dict[str, Any]) -> Artifact:
    names = {f.name for f in dataclasses.fields(Artifact)}
    unknown = set(data) - names
    if unknown:
        raise TypeError(f"unknown keys {sorted(unknown)}")
    return Artifact(**data)


def _check_relative(name: str) -> None:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise BundleError(f"artifact path {name!r} must be relative to the bundle and stay inside it")


def read_manifest(folder: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read `folder/manifest.json`; with verify=True also check every artifact's files and sha256 digests."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"bundle folder {folder} does not exist; create one with: python -m export CHECKPOINT --out {folder}")
    if not path.is_file():
        raise BundleError(f"{folder} is not a sqllava-edge bundle (no {MANIFEST_FILE}); create one with: "
                          f"python -m export CHECKPOINT --out {folder}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle") from None
    manifest = Manifest.from_dict(data, source=str(path))
    if verify:
        manifest.verify(folder)
    return manifest


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write `folder/manifest.json` atomically (the artifacts must already be in `folder`)."""
    for artifact in manifest.artifacts:
        artifact.check_schema()
    path = Path(folder) / MANIFEST_FILE
    with atomic_write(path, "w") as handle:
        os.fchmod(handle.fileno(), shareable_mode(0o666))  # mkstemp makes 0600; a bundle is meant to be shared
        json.dump(manifest.to_dict(), handle, indent=2)
        handle.write("\n")
    return path


def shareable_mode(mode: int) -> int:
    """`mode` limited by the process umask (what a plain open()/mkdir() would have given)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def preprocessing_for(config) -> dict[str, Any]:
    """The manifest's preprocessing block for a ModelConfig (docs/spec.md 1.3: CLIP processor, bicubic)."""
    vision = config.vision
    return {"mode": config.image_aspect_ratio, "image_size": vision.image_size, "mean": list(vision.image_mean),
            "std": list(vision.image_std), "resample": "bicubic"}
