"""sqllava-edge checkpoint folders: save and load, atomically and safely. Layout: docs/DESIGN.md.

Base weights are plain transformers folders (`llm/` loads as LlamaForCausalLM, `vision/` as CLIPVisionModel), LoRA
adapters are PEFT adapter folders, the projector is one safetensors file with the reference's names (docs/spec.md 1.4.1).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from sqllava_edge.config import ModelConfig
from sqllava_edge.errors import CheckpointError
from sqllava_edge.fileutil import atomic_dir

if TYPE_CHECKING:  # torch loads inside the functions that use it: META_FILE / read_meta / is_checkpoint need none
    import torch

FORMAT = "sqllava-edge-checkpoint"
VERSION = 1
META_FILE = "sqllava_edge.json"


def is_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / META_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A training run folder (holding checkpoint/) or a checkpoint folder -> the checkpoint folder."""
    path = Path(path)
    if is_checkpoint(path / "checkpoint"):
        return path / "checkpoint"
    if is_checkpoint(path):
        return path
    raise FileNotFoundError(f"{path} is neither a training run folder nor a sqllava-edge checkpoint")


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / META_FILE
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{folder} is not a sqllava-edge checkpoint (no {META_FILE}). For released SQ-LLaVA or LLaVA folders, "
            "import them first: python -m sqllava_edge.convert --help"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint is corrupt, re-create it") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: expected format {FORMAT} version {VERSION}, found {meta.get('format')} {meta.get('version')}")
    return meta


def base_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own weights with any injected LoRA layers removed (PEFT `base_layer` wrappers unwrapped)."""
    from_peft = hasattr(module, "get_base_model")
    module = module.get_base_model() if from_peft else module
    state = {}
    for key, value in module.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().contiguous()
    return state


def save_checkpoint(
    folder: str | os.PathLike,
    model,
    tokenizer=None,
    *,
    base_refs: dict[str, str] | None = None,
    provenance: dict[str, Any] | None = None,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `model` (an SQLLaVA, possibly with PEFT LoRA on `.llm` and/or `.vision.clip`) to `folder` atomically.

    base_refs: {"llm": path, "vision": path} to reference existing base folders instead of copying their weights.
    extra: called with the temporary folder to add more files (e.g. the training state) before the rename.
    """
    from safetensors.torch import save_file

    from sqllava_edge.model import hf_clip_config, hf_llama_config

    config: ModelConfig = model.config
    base_refs = dict(base_refs or {})
    folder = Path(folder)
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(), "base": {}, "lora": {},
            "provenance": provenance or {}}
    with atomic_dir(folder) as tmp:
        for part, module, hf_config in (("llm", model.llm, hf_llama_config(config.llm)),
                                        ("vision", model.vision.clip, hf_clip_config(config.vision))):
            if part in base_refs:
                meta["base"][part] = str(Path(base_refs[part]).resolve())
            else:
                (tmp / part).mkdir()
                hf_config.save_pretrained(tmp / part)
                save_file(base_state_dict(module), str(tmp / part / "model.safetensors"), metadata={"format": "pt"})
                meta["base"][part] = part
            lora_dir = {"llm": "llm_lora", "vision": "vit_lora"}[part]
            if hasattr(module, "peft_config"):
                module.save_pretrained(str(tmp / lora_dir), safe_serialization=True)
                meta["lora"][part] = lora_dir
            else:
                meta["lora"][part] = None
        save_file({k: v.detach().contiguous() for k, v in model.projector.state_dict().items()},
                  str(tmp / "projector.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        if extra is not None:
            extra(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def load_checkpoint(
    folder: str | os.PathLike,
    *,
    merge_lora: bool = False,
    trainable_lora: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """-> (SQLLaVA, Tokenizer). LoRA adapters are attached (PEFT) or merged into the base weights.
    dtype: of the loaded weights (default torch.float32)."""
    import torch

    from sqllava_edge.model import SQLLaVA, VisionTower, build_projector

    dtype = torch.float32 if dtype is None else dtype

    folder = Path(folder)
    meta = read_meta(folder)
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder / META_FILE}: invalid model config ({exc})") from None
    llm = _load_base(folder, meta, "llm", config, dtype)
    clip = _load_base(folder, meta, "vision", config, dtype)
    projector = build_projector(config)
    _load_projector(projector, folder / "projector.safetensors")
    model = SQLLaVA(config, VisionTower(config.vision, clip), projector.to(dtype), llm)
    for part, attr_owner, attr in (("llm", model, "llm"), ("vision", model.vision, "clip")):
        lora = meta["lora"].get(part)
        if lora:
            setattr(attr_owner, attr, _attach_lora(getattr(attr_owner, attr), folder / lora, merge_lora, trainable_lora))
    return model.to(device), _load_tokenizer(folder, config)


def _resolve(folder: Path, ref: str) -> Path:
    path = Path(ref)
    return path if path.is_absolute() else folder / path


def _load_base(folder: Path, meta: dict, part: str, config: ModelConfig, dtype: torch.dtype):
    from safetensors import SafetensorError
    from transformers import CLIPVisionModel, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    path = _resolve(folder, meta["base"][part])
    if not (path / "config.json").is_file():
        raise CheckpointError(f"base {part} weights missing: {path} has no config.json (checkpoint {folder})")
    cls = LlamaForCausalLM if part == "llm" else CLIPVisionModel
    hf_logging.disable_progress_bar()
    try:
        module = cls.from_pretrained(str(path), dtype=dtype)
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:  # a truncated file raises SafetensorError
        raise CheckpointError(f"cannot load base {part} from {path}: {exc}") from None
    finally:
        hf_logging.enable_progress_bar()
    _check_shapes(part, module.config, config, path)
    return module


def _check_shapes(part: str, hf_config, config: ModelConfig, path: Path) -> None:
    if part == "llm":
        want = {"hidden_size": config.llm.hidden_size, "num_hidden_layers": config.llm.num_layers,
                "vocab_size": config.llm.vocab_size, "intermediate_size": config.llm.intermediate_size}
    else:
        want = {"hidden_size": config.vision.hidden_size, "num_hidden_layers": config.vision.num_layers,
                "image_size": config.vision.image_size, "patch_size": config.vision.patch_size}
    for key, value in want.items():
        if getattr(hf_config, key) != value:
            raise CheckpointError(f"{path}: {part} {key} is {getattr(hf_config, key)} but the model config says {value}")


def _load_projector(projector: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"projector weights missing: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-create the checkpoint") from None
    own = projector.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: projector keys do not match the config (missing {missing}, unexpected {unexpected})")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise CheckpointError(f"{path}: projector tensor {key} has shape {tuple(value.shape)}, config needs {tuple(own[key].shape)}")
    projector.load_state_dict(state)


def _attach_lora(module, adapter_dir: Path, merge: bool, trainable: bool):
    try:
        from peft import PeftModel
    except ImportError:
        raise CheckpointError(f"{adapter_dir} holds a LoRA adapter; install peft to load it: pip install 'sqllava-edge[train]'") from None
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"LoRA adapter folder {adapter_dir} has no adapter_config.json")
    try:
        wrapped = PeftModel.from_pretrained(module, str(adapter_dir), is_trainable=trainable and not merge)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"LoRA adapter {adapter_dir} does not fit its base model: {exc}") from None
    return wrapped.merge_and_unload() if merge else wrapped


def _load_tokenizer(folder: Path, config: ModelConfig):
    from sqllava_edge.tokenizer import default_tokenizer, load_tokenizer

    if (folder / "tokenizer").is_dir():
        tok = load_tokenizer(folder / "tokenizer")
    else:
        tok = default_tokenizer()
    # More embedding rows than tokens is fine (llava-hf pads 32002 tokens to 32064 rows); fewer would crash.
    if tok.vocab_size > config.llm.vocab_size:
        raise CheckpointError(f"{folder}: tokenizer has {tok.vocab_size} tokens but the LLM has only "
                              f"{config.llm.vocab_size} embedding rows")
    return tok
