"""Config translation for foreign layouts, both ways, and `export_official` (our checkpoint -> official SQ-LLaVA layout).

Spec: docs/spec.md 6.1 (files of a release), 6.3 (config.json keys), 2.1-2.2 (LoRA configs). Key names come from
sqllava_edge.release.names; this module only turns config dictionaries into a ModelConfig and back.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sqllava_edge.config import (CLIP_MEAN, CLIP_STD, PRESETS, LLMConfig, ModelConfig, ProjectorConfig,
                                 VisionConfig)
from sqllava_edge.errors import CheckpointError
from sqllava_edge.release.names import (CLIP_CONFIG_KEYS, LLAVA_HF_CONFIG_KEYS, OFFICIAL_CONFIG_KEYS,
                                        OFFICIAL_FIXED_KEYS, VALUE_MAPS, to_layout)

TEMPLATES = {"sqllava": "v1_sq", "llava": "v1", "llava-hf": "v1"}  # docs/spec.md 3.2 / 6: training template of each family
# transformers' defaults for keys a config.json may omit (LlamaConfig, CLIPVisionConfig).
LLAMA_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "bos_token_id": 1,
                  "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "tie_word_embeddings": False}
CLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
LORA_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "fan_in_fan_out", "rank_pattern",
               "alpha_pattern", "use_rslora")
# The reference builds Clustering(mm_hidden_size, hidden_size, 256, 2): 256 centres whatever config.num_latents says
# (sqllava/model/multimodal_projector/builder.py, docs/spec.md 1.4). No projector tensor depends on the number of centres
# (docs/spec.md 1.4.1: the pooling has no parameters), so it cannot be read from the weights either.
OFFICIAL_NUM_CENTERS = 256
IMAGE_PATCH_TOKEN = "<im_patch>"  # docs/spec.md 1.5 / 3.6: added by the official loader when mm_use_im_patch_token is on


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-download it") from None


def _mapped(path: str, value: Any, key: str, where: Path) -> Any:
    table = VALUE_MAPS.get(path)
    if table is None:
        return value
    if value not in table:
        what = "projector type" if path == "projector.type" else f"value for {key}"
        known = ", ".join(sorted(str(k) for k in table if k is not None))
        raise CheckpointError(f"{where}: unknown {what} {value!r} (config key {key}); supported: {known}")
    return table[value]


def llm_config(cfg: dict[str, Any], where: Path) -> LLMConfig:
    """LLaMA fields of an official config.json or a llava-hf text_config (docs/spec.md 6.3)."""
    cfg = {**LLAMA_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if "rope_parameters" in cfg:  # transformers 5 spelling
        cfg["rope_theta"] = cfg["rope_parameters"].get("rope_theta", cfg["rope_theta"])
    for key, want in (("hidden_act", "silu"), ("tie_word_embeddings", False), ("attention_bias", False),
                      ("mlp_bias", False)):
        if cfg.get(key, want) != want:
            raise CheckpointError(f"{where}: {key}={cfg[key]!r} is not a LLaMA/Vicuna setting this SDK supports ({want!r})")
    if cfg.get("rope_scaling") or cfg.get("rope_parameters", {}).get("rope_type", "default") != "default":
        raise CheckpointError(f"{where}: RoPE scaling is not supported (rope_scaling={cfg.get('rope_scaling')!r})")
    values = {}
    for key, path, _ in OFFICIAL_CONFIG_KEYS:
        if path.startswith("llm.") and key in cfg:
            values[path[4:]] = cfg[key]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
        if key not in values:
            raise CheckpointError(f"{where}: the LLaMA config lacks {key}; is this the model's config.json?")
    values.setdefault("num_kv_heads", values["num_heads"])
    return LLMConfig(**values)


def vision_config(clip_cfg: dict[str, Any], preprocessor: dict[str, Any] | None, select_layer: int, select_feature: str,
                  where: Path) -> VisionConfig:
    """A CLIP tower folder's config.json (CLIPVisionModel, or a full CLIPModel's vision_config) + preprocessor."""
    if clip_cfg.get("model_type") == "clip":
        clip_cfg = clip_cfg.get("vision_config") or {}
    cfg = {**CLIP_DEFAULTS, **{k: v for k, v in clip_cfg.items() if v is not None}}
    if cfg["hidden_act"] != "quick_gelu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r}; the OpenAI CLIP tower uses quick_gelu")
    values = {path[7:]: cfg[key] for key, path, _ in CLIP_CONFIG_KEYS}
    pre = preprocessor or {}
    mean, std = tuple(pre.get("image_mean", CLIP_MEAN)), tuple(pre.get("image_std", CLIP_STD))
    return VisionConfig(**values, select_layer=select_layer, select_feature=select_feature, image_mean=mean, image_std=std)


def official_model_config(cfg: dict[str, Any], clip_cfg: dict[str, Any], preprocessor: dict[str, Any] | None,
                          kind: str, where: Path, warnings: list[str] | None = None) -> ModelConfig:
    """ModelConfig from an official SQ-LLaVA / LLaVA-1.5 config.json (docs/spec.md 6.3) and its CLIP tower's config.

    Settings read the way the official code reads them, not as their names say, are described in `warnings`.
    """
    warnings = [] if warnings is None else warnings
    ptype = _mapped("projector.type", cfg.get("mm_projector_type", "linear"), "mm_projector_type", where)
    select = _mapped("vision.select_feature", cfg.get("mm_vision_select_feature", "patch"), "mm_vision_select_feature", where)
    aspect = official_aspect(cfg.get("image_aspect_ratio"), kind, where, warnings)
    vision = vision_config(clip_cfg, preprocessor, int(cfg.get("mm_vision_select_layer", -1)), select, where)
    if cfg.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise CheckpointError(f"{where}: mm_hidden_size={cfg['mm_hidden_size']} but the vision tower is "
                              f"{vision.hidden_size} wide; --vision-tower points at another CLIP model")
    if ptype == "cluster":
        latents = cfg.get("num_latents", OFFICIAL_NUM_CENTERS)
        if latents != OFFICIAL_NUM_CENTERS:
            warnings.append(f"num_latents={latents!r} in {where} is ignored: the official projector pools into "
                            f"{OFFICIAL_NUM_CENTERS} centres whatever it says (docs/spec.md 1.4), so the model runs with "
                            f"{OFFICIAL_NUM_CENTERS}")
        if vision.num_image_tokens < OFFICIAL_NUM_CENTERS:
            raise CheckpointError(f"{where}: the official cluster projector pools into {OFFICIAL_NUM_CENTERS} centres "
                                  f"but this vision tower gives {vision.num_image_tokens} image tokens; sqllava-edge "
                                  "needs at least one token per centre (num_latents does not change this, docs/spec.md 1.4)")
        projector = ProjectorConfig(type="cluster", num_centers=OFFICIAL_NUM_CENTERS)
    else:
        projector = ProjectorConfig(type=ptype, keep_unused_ln=False)
    return _named(vision, projector, llm_config(cfg, where), aspect, TEMPLATES[kind], kind, where)


def official_aspect(value: Any, kind: str, where: Path, warnings: list[str]) -> str:
    """Our image mode for config.json's image_aspect_ratio: the official process_images pads for "pad" only; every
    other value gets the CLIP processor alone, i.e. resize + centre crop (sqllava/mm_utils.py, train.py:928)."""
    table = VALUE_MAPS["image_aspect_ratio"]
    if isinstance(value, str) and value.startswith("anyres") and kind == "llava":
        raise CheckpointError(f"{where}: image_aspect_ratio={value!r} is LLaVA-NeXT's image tiling, which sqllava-edge "
                              "does not implement; only LLaVA-1.5 folders (pad or square) can be imported")
    if (value is None or isinstance(value, str)) and value in table:
        return table[value]
    warnings.append(f"image_aspect_ratio={value!r} in {where} is read as a centre crop (our 'crop'), as the official "
                    "code does for every value but 'pad' (mm_utils.process_images)")
    return "crop"


def added_tokens(cfg: dict[str, Any], where: Path) -> list[str]:
    """Tokens the official loader adds to the tokenizer before `resize_token_embeddings(len(tokenizer))`
    (sqllava/model/builder.py, docs/spec.md 6.2 / 3.6). mm_use_im_patch_token defaults to True when the key is missing;
    mm_use_im_start_end is refused: it changes every prompt, which sqllava-edge does not build."""
    if cfg.get("mm_use_im_start_end", False):
        raise CheckpointError(
            f"{where} sets mm_use_im_start_end=true: such a model expects <im_start><image><im_end> around every image "
            "(two more tokens, trained embedding rows), and sqllava-edge builds prompts with <image> alone. The "
            "released SQ-LLaVA and LLaVA-1.5 models set it to false. If this model was trained without "
            "--mm_use_im_start_end True, set \"mm_use_im_start_end\": false in config.json and convert again; "
            "otherwise it cannot be imported")
    return [IMAGE_PATCH_TOKEN] if cfg.get("mm_use_im_patch_token", True) else []


def llava_hf_model_config(cfg: dict[str, Any], preprocessor: dict[str, Any] | None, where: Path) -> ModelConfig:
    """ModelConfig from transformers' LlavaConfig (config.json of a llava-hf folder)."""
    values = {}
    for key, path, _ in LLAVA_HF_CONFIG_KEYS:
        values[path] = _mapped(path, cfg.get(key, {"vision_feature_layer": -2, "vision_feature_select_strategy": "default",
                                                  "projector_hidden_act": "gelu"}[key]), key, where)
    if not isinstance(values["vision.select_layer"], int):
        raise CheckpointError(f"{where}: vision_feature_layer={values['vision.select_layer']!r}; only one layer is supported")
    if cfg.get("multimodal_projector_bias", True) is not True:
        raise CheckpointError(f"{where}: unknown projector type: an mlp2x_gelu without biases (multimodal_projector_bias)")
    vision = vision_config(cfg.get("vision_config") or {}, preprocessor, values["vision.select_layer"],
                           values["vision.select_feature"], where)
    projector = ProjectorConfig(type=values["projector.type"], keep_unused_ln=False)
    aspect = "pad" if (preprocessor or {}).get("do_pad") else "crop"
    return _named(vision, projector, llm_config(cfg.get("text_config") or {}, where), aspect, "v1", "llava-hf", where)


def _named(vision, projector, llm, aspect, template, kind, where) -> ModelConfig:
    try:
        config = ModelConfig("imported", vision, projector, llm, image_aspect_ratio=aspect, template=template)
    except ValueError as exc:
        raise CheckpointError(f"{where}: the configs describe an unsupported model ({exc})") from None
    for name, preset in PRESETS.items():  # a known shape keeps its preset name
        if preset.replace(name="imported") == config:
            return preset
    return config.replace(name=f"imported-{kind}")


def lora_config_fields(adapter_config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The LoraConfig fields we keep from an adapter_config.json (PEFT 0.4 or newer); refuses what we cannot load."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {adapter_config.get('peft_type')!r}; only LoRA adapters are supported")
    if adapter_config.get("bias", "none") != "none" or adapter_config.get("modules_to_save") or adapter_config.get("use_dora"):
        raise CheckpointError(f"{where}: adapters that train biases, extra modules (modules_to_save) or DoRA are not "
                              "supported; the released SQ-LLaVA adapters use bias=none")
    fields = {k: adapter_config[k] for k in LORA_FIELDS if adapter_config.get(k) is not None}
    if "r" not in fields or "lora_alpha" not in fields or "target_modules" not in fields:
        raise CheckpointError(f"{where}: adapter_config.json lacks r, lora_alpha or target_modules")
    return fields


# ----------------------------------------------------------------------------------------------------------------
# Our checkpoint -> official layout


def official_config_json(config: ModelConfig, vision_tower: str) -> dict[str, Any]:
    """config.json of an SQ-LLaVA release for `config` (docs/spec.md 6.3), in transformers 4.31 spelling."""
    llm = config.llm
    out: dict[str, Any] = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",
                           "initializer_range": 0.02, "pretraining_tp": 1, "rope_scaling": None,
                           "tie_word_embeddings": False, "mm_vision_tower": vision_tower}
    reverse = {v: k for k, v in VALUE_MAPS["image_aspect_ratio"].items() if k is not None}
    if config.image_aspect_ratio not in reverse:
        raise CheckpointError(f"image_aspect_ratio {config.image_aspect_ratio!r} has no official equivalent (pad, square)")
    if config.projector.type == "cluster" and config.projector.em_iterations != 2:
        raise CheckpointError("the official cluster projector hard-codes 2 EM iterations (docs/spec.md 1.4); this model uses "
                              f"{config.projector.em_iterations}")
    if config.projector.type == "cluster" and config.projector.num_centers != OFFICIAL_NUM_CENTERS:
        raise CheckpointError(f"the official cluster projector hard-codes {OFFICIAL_NUM_CENTERS} centres (docs/spec.md 1.4; "
                              f"num_latents is not read); this model uses {config.projector.num_centers}, so the "
                              "official code would compute other image features")
    values = {"llm." + k: getattr(llm, k) for k in vars(llm)}
    values.update({"projector.type": config.projector.type, "projector.num_centers": config.projector.num_centers,
                   "vision.hidden_size": config.vision.hidden_size, "vision.select_layer": config.vision.select_layer,
                   "vision.select_feature": config.vision.select_feature,
                   "image_aspect_ratio": reverse[config.image_aspect_ratio]})
    for key, path, _ in OFFICIAL_CONFIG_KEYS:
        out[key] = values[path]
    if config.projector.type != "cluster":
        del out["num_latents"]
    return {**out, **OFFICIAL_FIXED_KEYS}


def official_lora_config(fields: dict[str, Any], base: str, task_type: str | None) -> dict[str, Any]:
    """adapter_config.json as PEFT 0.4 wrote it (docs/spec.md 2.1 / 2.2)."""
    return {"auto_mapping": None, "base_model_name_or_path": base, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
            "lora_alpha": fields["lora_alpha"], "lora_dropout": fields.get("lora_dropout", 0.0), "modules_to_save": None,
            "peft_type": "LORA", "r": fields["r"], "revision": None, "target_modules": sorted(fields["target_modules"]),
            "task_type": task_type}


def export_official(checkpoint, out_dir, *, include_base: bool = True, max_shard_bytes: int = 2 << 30) -> Path:
    """Write our checkpoint in the official SQ-LLaVA release layout (docs/spec.md 6.1); -> `out_dir`.

    out_dir/config.json (mm_* keys), adapter_config.json + adapter_model.bin (the LLM-LoRA, plus the ViT-LoRA tensors
    the release also carries), non_lora_trainables.bin (projector), Vit-lora/. Without an LLM-LoRA the folder is a
    full LLaVA model instead (sharded pytorch_model-*.bin including model.mm_projector.*). include_base: also write the
    base LLM (base/: sharded .bin + index + tokenizer) and the CLIP tower (vision_tower/: vision_model.* names);
    otherwise the configs point at the checkpoint's own base folders.
    """
    from safetensors.torch import load_file

    from sqllava_edge.checkpoint import read_meta
    from sqllava_edge.fileutil import atomic_dir

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    meta = read_meta(checkpoint)
    config = ModelConfig.from_dict(meta["config"])
    bases = {part: _resolve(checkpoint, meta["base"][part]).resolve() for part in ("llm", "vision")}
    loras = {part: checkpoint / meta["lora"][part] if meta["lora"].get(part) else None for part in ("llm", "vision")}
    projector = load_file(str(checkpoint / "projector.safetensors"))
    with atomic_dir(out_dir) as tmp:
        if loras["llm"] is None:  # full model: the LLM weights (with the projector) are the folder itself
            llm_tmp, llm_ref = tmp, out_dir
        else:
            llm_tmp, llm_ref = (tmp / "base", out_dir / "base") if include_base else (None, bases["llm"])
        tower_tmp, tower_ref = (tmp / "vision_tower", out_dir / "vision_tower") if include_base else (None, bases["vision"])
        if llm_tmp is not None:
            _export_weights(bases["llm"], llm_tmp, "official_llm", "llm", max_shard_bytes, "bin",
                            None if loras["llm"] else projector)
            (llm_tmp / "config.json").write_text(json.dumps(_llama_base_json(config), indent=2))
        if tower_tmp is not None:
            _export_weights(bases["vision"], tower_tmp, "clip", "vision", max_shard_bytes, "safetensors", None)
            _write_tower_configs(tower_tmp, config)
        if (checkpoint / "tokenizer").is_dir():  # the official loader reads the tokenizer from --model-base
            for item in (checkpoint / "tokenizer").iterdir():
                shutil.copy2(item, (llm_tmp or tmp) / item.name)
        (tmp / "config.json").write_text(json.dumps(official_config_json(config, str(tower_ref)), indent=2))
        _export_adapters(loras, tmp, projector, str(llm_ref), str(tower_ref))
    return out_dir


def _export_weights(src: Path, dst: Path, layout: str, part: str, max_shard_bytes: int, fmt: str, projector) -> None:
    """Copy our base weights under the `layout` names, shard by shard (plus the projector for a full LLaVA folder)."""
    from sqllava_edge.release.weights import ShardWriter, find_weights, iter_tensors

    files = find_weights(src)
    shapes = {to_layout(layout, part, key): handle.shape(key) for _, key, handle in iter_tensors(files)}
    extra = {to_layout(layout, "projector", k): v for k, v in (projector or {}).items()}
    writer = ShardWriter(dst, {**shapes, **{k: tuple(v.shape) for k, v in extra.items()}}, None, part,
                         max_shard_bytes, fmt=fmt)
    last = None
    for number, key, handle in iter_tensors(files):
        if number != last:
            writer.flush()
            last = number
        writer.add(to_layout(layout, part, key), handle.get(key), str(handle.path))
    for key, value in extra.items():
        writer.add(key, value, "projector.safetensors")
    writer.finish()


def _export_adapters(loras: dict, tmp: Path, projector: dict, llm_ref: str, tower_ref: str) -> None:
    import torch

    vit = _read_adapter(loras["vision"]) if loras["vision"] else None
    if loras["llm"] is not None:
        fields, tensors = _read_adapter(loras["llm"])
        if vit is not None:  # the release's adapter_model.bin also carries the ViT-LoRA (docs/spec.md 6.1)
            tensors.update({to_layout("official_adapter", "vit_lora", k): v for k, v in vit[1].items()})
        lora_cfg = official_lora_config(fields, llm_ref, "CAUSAL_LM")
        (tmp / "adapter_config.json").write_text(json.dumps(lora_cfg, indent=2))
        torch.save(tensors, tmp / "adapter_model.bin")
        torch.save({to_layout("official_non_lora", "projector", k): v for k, v in projector.items()},
                   tmp / "non_lora_trainables.bin")
    if vit is not None:
        (tmp / "Vit-lora").mkdir()
        vit_cfg = official_lora_config(vit[0], tower_ref, None)
        (tmp / "Vit-lora" / "adapter_config.json").write_text(json.dumps(vit_cfg, indent=2))
        torch.save({to_layout("official_vit_adapter", "vit_lora", k): v for k, v in vit[1].items()},
                   tmp / "Vit-lora" / "adapter_model.bin")


def _resolve(folder: Path, ref: str) -> Path:
    path = Path(ref)
    return path if path.is_absolute() else folder / path


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict]:
    from sqllava_edge.release.weights import TensorFile

    fields = lora_config_fields(read_json(folder / "adapter_config.json"), folder)
    path = folder / "adapter_model.safetensors"
    with TensorFile(path if path.is_file() else folder / "adapter_model.bin") as handle:
        return fields, {k: handle.get(k) for k in handle.keys()}


def _llama_base_json(config: ModelConfig) -> dict[str, Any]:
    out = {k: v for k, v in official_config_json(config, "").items() if not k.startswith("mm_")}
    for key in [*OFFICIAL_FIXED_KEYS, "num_latents", "image_aspect_ratio"]:
        out.pop(key, None)
    return {**out, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "use_cache": True}


def _write_tower_configs(folder: Path, config: ModelConfig) -> None:
    from sqllava_edge.model import hf_clip_config

    hf_clip_config(config.vision).save_pretrained(folder)
    size = config.vision.image_size
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "crop_size": {"height": size, "width": size},
        "size": {"shortest_edge": size}, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
        "image_mean": list(config.vision.image_mean), "image_std": list(config.vision.image_std)}, indent=2))
