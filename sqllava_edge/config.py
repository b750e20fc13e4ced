"""Typed configuration of an SQ-LLaVA model and its named presets.

Spec: docs/spec.md sections 1.1-1.4 and 6.3. Every field that is not obvious says where its default comes from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# docs/spec.md 1.5: the id that marks the image placeholder inside token ids, and the label that means "no loss".
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

# OpenAI CLIP normalisation constants (docs/spec.md 1.3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PROJECTOR_TYPES = ("cluster", "mlp2x_gelu", "linear", "identity")
ASPECT_MODES = ("pad", "crop", "resize")


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # index into HF hidden_states (docs/spec.md 1.2): -2 = output of the 23rd of 24 layers
    select_feature: str = "patch"  # "patch" drops CLS (docs/spec.md 1.2); "cls_patch" keeps it
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + (1 if self.select_feature == "cls_patch" else 0)

    @property
    def layers_used(self) -> int:
        """How many encoder layers run: hidden_states has num_layers+1 entries, the embeddings first."""
        index = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 0 <= index <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} is outside 0..{self.num_layers} (or -1..-{self.num_layers + 1})")
        return index


@dataclass(frozen=True)
class ProjectorConfig:
    type: str = "cluster"  # one of PROJECTOR_TYPES; "cluster" = SQ-LLaVA prototype extractor + QuickGELU MLP
    num_centers: int = 256  # hard-coded 256 in the reference code (docs/spec.md 1.4)
    em_iterations: int = 2  # hard-coded num_clusters=2 soft-EM rounds (docs/spec.md 1.4)
    keep_unused_ln: bool = True  # the reference module owns ln_1 but never uses it (docs/spec.md 1.4.1); kept for key parity


@dataclass(frozen=True)
class LLMConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    max_position_embeddings: int = 4096  # Vicuna-v1.5 (docs/spec.md 6.3)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0  # pad = unk (docs/spec.md 1.5)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_aspect_ratio: str = "pad"  # stage 2 / released model preprocessing (docs/spec.md 1.3); "crop" = CLIP processor
    template: str = "v1_sq"  # conversation template used for training and self-questioning (docs/spec.md 3.2)

    def __post_init__(self) -> None:
        if self.projector.type not in PROJECTOR_TYPES:
            raise ValueError(f"unknown projector type {self.projector.type!r}; known: {', '.join(PROJECTOR_TYPES)}")
        if self.image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(f"unknown image_aspect_ratio {self.image_aspect_ratio!r}; known: {', '.join(ASPECT_MODES)}")
        if self.projector.type == "cluster" and self.projector.num_centers > self.vision.num_image_tokens:
            raise ValueError("projector.num_centers must not exceed the number of image tokens")
        self.vision.layers_used  # validates select_layer

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_image_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are an error so a config from another tool is never half-read."""
        data = dict(data)
        parts = {"vision": VisionConfig, "projector": ProjectorConfig, "llm": LLMConfig}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in parts:
                kwargs[key] = _build(parts[key], value)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ValueError(f"unknown model config key {key!r}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _build(kind: type, value: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(value) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
    value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    return kind(**value)


_CLIP_L_336 = VisionConfig()
_LLAMA_7B = LLMConfig()
_LLAMA_13B = LLMConfig(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40)

PRESETS: dict[str, ModelConfig] = {
    "sqllava-7b": ModelConfig("sqllava-7b", _CLIP_L_336, ProjectorConfig(), _LLAMA_7B),
    "sqllava-13b": ModelConfig("sqllava-13b", _CLIP_L_336, ProjectorConfig(), _LLAMA_13B),
    "llava-1.5-7b": ModelConfig(
        "llava-1.5-7b", _CLIP_L_336, ProjectorConfig(type="mlp2x_gelu", keep_unused_ln=False), _LLAMA_7B, template="v1"
    ),
    # Small enough to train on a laptop CPU in minutes: 112 px / patch 14 -> 64 image tokens, the real 32000 vocabulary.
    "tiny": ModelConfig(
        "tiny",
        VisionConfig(image_size=112, patch_size=14, hidden_size=128, intermediate_size=512, num_layers=3, num_heads=4),
        ProjectorConfig(num_centers=16),
        LLMConfig(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=4,
                  max_position_embeddings=2048),
    ),
    # Real-size vision (CLIP ViT-L/14-336) + a TinyLlama-1.1B-shaped LLM: for benchmarks with random weights.
    "bench-1b": ModelConfig(
        "bench-1b",
        _CLIP_L_336,
        ProjectorConfig(),
        LLMConfig(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                  max_position_embeddings=2048),
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None
