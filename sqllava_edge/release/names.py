"""The one table of tensor and config-key names: official SQ-LLaVA / liuhaotian LLaVA-1.5 / llava-hf <-> ours.

Our names (docs/DESIGN.md checkpoint layout):
  llm        keys of transformers' LlamaForCausalLM        ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight")
  vision     keys of transformers 5 CLIPVisionModel         ("encoder.layers.0.mlp.fc1.weight", no "vision_model." prefix)
  projector  keys of sqllava_edge.model.build_projector     ("c.weight", "mlp.0.weight", "sim_alpha"; mlp2x_gelu: "0.weight")
  llm_lora   PEFT adapter keys of a PeftModel on the LLM    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
  vit_lora   PEFT adapter keys of a PeftModel on the CLIP   ("base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight")
  ignore     tensors a source carries that we deliberately drop (each rule says why)

A rule is a pair of templates; "{i}" matches digits, "{rest}" matches the remainder of the key. The first rule of a
(layout, part) pair is the canonical one, used when writing that layout (`to_layout`). GGUF names are not here: the
export code takes them from gguf-py. WEIGHT_STEMS names the weight files of a transformers folder.
This module imports no torch (tests/test_no_torch.py checks it), so anything may read these tables.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

PARTS = ("llm", "vision", "projector", "llm_lora", "vit_lora", "ignore")
WEIGHT_STEMS = ("model", "pytorch_model")  # HF weight file names; safetensors preferred over pickles


@dataclass(frozen=True)
class NameRule:
    layout: str  # which kind of file the key is read from (see LAYOUTS)
    theirs: str  # template of the key in that file
    part: str  # one of PARTS
    ours: str  # template of our key ("" for part "ignore")
    source: str  # provenance: where the foreign name comes from


LAYOUTS = {
    "official_llm": "weights of a LlavaLlamaForCausalLM folder (liuhaotian LLaVA-1.5 / ShareGPT4V base / merged SQ-LLaVA)",
    "official_adapter": "adapter_model.bin/.safetensors of an SQ-LLaVA or LLaVA LoRA release",
    "official_vit_adapter": "Vit-lora/adapter_model.bin of an SQ-LLaVA release",
    "official_non_lora": "non_lora_trainables.bin (LoRA releases) or mm_projector.bin (projector pre-training)",
    "clip": "a CLIP tower folder (CLIPVisionModel or full CLIPModel, transformers 4 or 5 naming)",
    "llava_hf": "transformers' LlavaForConditionalGeneration folder (llava-hf/*), transformers 4 or 5 naming",
}

RULES: tuple[NameRule, ...] = (
    # --- LlavaLlamaForCausalLM state dict (docs/spec.md 1.4 "prefix model.mm_projector.", docs/spec.md 6.2 step 2).
    NameRule("official_llm", "model.mm_projector.{rest}", "projector", "{rest}",
             "docs/spec.md 1.4.1 / 6.2: projector keys model.mm_projector.* (cluster: c.weight...; mlp2x_gelu: 0.*, 2.*)"),
    NameRule("official_llm", "model.vision_tower.vision_tower.vision_model.{rest}", "ignore", "",
             "docs/spec.md 6.2: a tower saved inside the LLM checkpoint is never read; the tower loads from mm_vision_tower"),
    NameRule("official_llm", "model.layers.{i}.self_attn.rotary_emb.inv_freq", "ignore", "",
             "transformers 4.31 and earlier save the RoPE frequency buffer (persistent in LlamaRotaryEmbedding); it "
             "is recomputed from rope_theta"),
    NameRule("official_llm", "model.{rest}", "llm", "model.{rest}", "HF LlamaForCausalLM naming (docs/spec.md 1.6)"),
    NameRule("official_llm", "lm_head.{rest}", "llm", "lm_head.{rest}", "HF LlamaForCausalLM naming (docs/spec.md 1.6)"),
    # --- adapter_model.* of a stage-2 release: LLM-LoRA and, mixed in, ViT-LoRA (docs/spec.md 6.1 "Stage 2", 8.15).
    NameRule("official_adapter", "base_model.model.model.vision_tower.vision_tower.vision_model.{rest}", "vit_lora",
             "base_model.model.{rest}", "docs/spec.md 6.1: ViT-LoRA tensors inside adapter_model.bin (silently unused, docs/spec.md 8.15)"),
    NameRule("official_adapter", "base_model.model.{rest}", "llm_lora", "base_model.model.{rest}",
             "docs/spec.md 6.1 / 2.1: PEFT on LlavaLlamaForCausalLM, same keys as PEFT on LlamaForCausalLM"),
    # --- Vit-lora/adapter_model.* (docs/spec.md 6.1: PEFT applied to the CLIPVisionTower wrapper, docs/spec.md 2.2).
    NameRule("official_vit_adapter", "base_model.model.vision_tower.vision_model.{rest}", "vit_lora",
             "base_model.model.{rest}", "docs/spec.md 6.1: keys base_model.model.vision_tower.vision_model.encoder.layers.*"),
    # --- non_lora_trainables.bin / mm_projector.bin (docs/spec.md 6.1, 6.2 step 3).
    NameRule("official_non_lora", "base_model.model.model.mm_projector.{rest}", "projector", "{rest}",
             "docs/spec.md 6.1: non_lora_trainables.bin keys base_model.model.model.mm_projector.*"),
    NameRule("official_non_lora", "model.mm_projector.{rest}", "projector", "{rest}",
             "docs/spec.md 6.1 stage 1: mm_projector.bin keys model.mm_projector.*"),
    NameRule("official_non_lora", "base_model.model.model.{rest}", "llm", "model.{rest}",
             "docs/spec.md 6.2 step 3 (strip base_model., then model.): trained LLM tensors, e.g. embed_tokens"),
    NameRule("official_non_lora", "base_model.model.lm_head.{rest}", "llm", "lm_head.{rest}",
             "docs/spec.md 6.2 step 3: a trained lm_head"),
    # --- CLIP tower folders (docs/spec.md 1.2: HF CLIPVisionModel; openai/clip-vit-large-patch14-336 is a full CLIPModel).
    NameRule("clip", "vision_model.embeddings.position_ids", "ignore", "",
             "buffer saved by transformers < 4.31; recomputed"),
    NameRule("clip", "embeddings.position_ids", "ignore", "", "buffer saved by transformers < 4.31; recomputed"),
    NameRule("clip", "vision_model.{rest}", "vision", "{rest}",
             "HF CLIPVisionModel / CLIPModel files before transformers 5 (the layout the official code reads)"),
    NameRule("clip", "text_model.{rest}", "ignore", "", "full CLIPModel: the text tower is not used by LLaVA"),
    NameRule("clip", "visual_projection.{rest}", "ignore", "", "full CLIPModel: contrastive head, not used by LLaVA"),
    NameRule("clip", "text_projection.{rest}", "ignore", "", "full CLIPModel: contrastive head, not used by LLaVA"),
    NameRule("clip", "logit_scale", "ignore", "", "full CLIPModel: contrastive temperature, not used by LLaVA"),
    NameRule("clip", "{rest}", "vision", "{rest}", "transformers 5 CLIPVisionModel files (no vision_model. prefix)"),
    # --- llava-hf (transformers models/llava/modeling_llava.py; 5.x writes the 4.x names on save_pretrained).
    NameRule("llava_hf", "vision_tower.vision_model.embeddings.position_ids", "ignore", "",
             "buffer saved by transformers < 4.31; recomputed"),
    NameRule("llava_hf", "language_model.model.{rest}", "llm", "model.{rest}", "llava-hf files (transformers 4.x names)"),
    NameRule("llava_hf", "model.language_model.{rest}", "llm", "model.{rest}", "transformers 5 LlavaModel in memory"),
    NameRule("llava_hf", "language_model.lm_head.{rest}", "llm", "lm_head.{rest}", "llava-hf files (transformers 4.x)"),
    NameRule("llava_hf", "lm_head.{rest}", "llm", "lm_head.{rest}", "transformers 5 LlavaForConditionalGeneration"),
    NameRule("llava_hf", "vision_tower.vision_model.{rest}", "vision", "{rest}", "llava-hf files (transformers 4.x)"),
    NameRule("llava_hf", "model.vision_tower.vision_model.{rest}", "vision", "{rest}", "transformers >= 4.52 names"),
    NameRule("llava_hf", "model.vision_tower.{rest}", "vision", "{rest}", "transformers 5 CLIPVisionModel without prefix"),
    NameRule("llava_hf", "vision_tower.{rest}", "vision", "{rest}", "transformers 5 save_pretrained output"),
    NameRule("llava_hf", "multi_modal_projector.linear_1.{rest}", "projector", "0.{rest}",
             "LlavaMultiModalProjector linear_1 = mlp2x_gelu layer 0 (docs/spec.md 1.4.3)"),
    NameRule("llava_hf", "multi_modal_projector.linear_2.{rest}", "projector", "2.{rest}",
             "LlavaMultiModalProjector linear_2 = mlp2x_gelu layer 2 (docs/spec.md 1.4.3)"),
    NameRule("llava_hf", "model.multi_modal_projector.linear_1.{rest}", "projector", "0.{rest}", "transformers 5 names"),
    NameRule("llava_hf", "model.multi_modal_projector.linear_2.{rest}", "projector", "2.{rest}", "transformers 5 names"),
)


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(pattern + "$")


@lru_cache(maxsize=None)
def _compiled(layout: str) -> tuple[tuple[NameRule, re.Pattern, re.Pattern], ...]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown name layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return tuple((r, _regex(r.theirs), _regex(r.ours) if r.ours else None) for r in RULES if r.layout == layout)


def to_ours(layout: str, key: str) -> tuple[str, str, NameRule] | None:
    """Map a key read from a file of `layout` to (part, our key, rule); None when no rule knows the key."""
    for rule, theirs, _ in _compiled(layout):
        match = theirs.match(key)
        if match:
            return rule.part, rule.ours.format(**match.groupdict()) if rule.ours else "", rule
    return None


def to_layout(layout: str, part: str, key: str) -> str:
    """Map our `key` of `part` to the canonical key of `layout` (the first rule of that layout and part that fits)."""
    for rule, _, ours in _compiled(layout):
        if rule.part == part and ours is not None:
            match = ours.match(key)
            if match:
                return rule.theirs.format(**match.groupdict())
    raise KeyError(f"no {layout} name for our {part} key {key!r}")


# ----------------------------------------------------------------------------------------------------------------
# Config keys. (their key, our ModelConfig path, provenance). Values pass through unchanged unless VALUE_MAPS says.

OFFICIAL_CONFIG_KEYS: tuple[tuple[str, str, str], ...] = (
    ("mm_projector_type", "projector.type", "docs/spec.md 6.3 (LLaVA default when absent: linear)"),
    ("num_latents", "projector.num_centers",
     "docs/spec.md 6.3 / 1.4: written (256) but never read, the reference hard-codes 256 centres; import uses 256"),
    ("mm_hidden_size", "vision.hidden_size", "docs/spec.md 6.3: CLIP width the projector expects"),
    ("mm_vision_select_layer", "vision.select_layer", "docs/spec.md 6.3 / 1.2"),
    ("mm_vision_select_feature", "vision.select_feature", "docs/spec.md 6.3 / 1.2 (default patch)"),
    ("image_aspect_ratio", "image_aspect_ratio",
     "docs/spec.md 6.3 / 1.3 (pad; LLaVA default square; the reference crops for every value but pad)"),
    ("vocab_size", "llm.vocab_size", "LLaMA config (docs/spec.md 6.3)"),
    ("hidden_size", "llm.hidden_size", "LLaMA config"),
    ("intermediate_size", "llm.intermediate_size", "LLaMA config"),
    ("num_hidden_layers", "llm.num_layers", "LLaMA config"),
    ("num_attention_heads", "llm.num_heads", "LLaMA config"),
    ("num_key_value_heads", "llm.num_kv_heads", "LLaMA config (absent in Vicuna-v1.5 = num_attention_heads)"),
    ("max_position_embeddings", "llm.max_position_embeddings", "LLaMA config"),
    ("rms_norm_eps", "llm.rms_norm_eps", "LLaMA config"),
    ("rope_theta", "llm.rope_theta", "LLaMA config (absent before transformers 4.33 = 10000)"),
    ("bos_token_id", "llm.bos_token_id", "LLaMA config"),
    ("eos_token_id", "llm.eos_token_id", "LLaMA config"),
    ("pad_token_id", "llm.pad_token_id", "LLaMA config (docs/spec.md 1.5: pad = unk = 0)"),
)

CLIP_CONFIG_KEYS: tuple[tuple[str, str, str], ...] = (
    ("image_size", "vision.image_size", "HF CLIPVisionConfig"),
    ("patch_size", "vision.patch_size", "HF CLIPVisionConfig"),
    ("hidden_size", "vision.hidden_size", "HF CLIPVisionConfig"),
    ("intermediate_size", "vision.intermediate_size", "HF CLIPVisionConfig"),
    ("num_hidden_layers", "vision.num_layers", "HF CLIPVisionConfig"),
    ("num_attention_heads", "vision.num_heads", "HF CLIPVisionConfig"),
    ("layer_norm_eps", "vision.layer_norm_eps", "HF CLIPVisionConfig"),
)

LLAVA_HF_CONFIG_KEYS: tuple[tuple[str, str, str], ...] = (
    ("vision_feature_layer", "vision.select_layer", "transformers LlavaConfig (int; a list of layers is not supported)"),
    ("vision_feature_select_strategy", "vision.select_feature", "transformers LlavaConfig: default drops CLS"),
    ("projector_hidden_act", "projector.type", "transformers LlavaConfig: gelu = LLaVA-1.5 mlp2x_gelu"),
)

# Foreign value -> our value, per our config path. A value missing here is an error naming the key, except for
# image_aspect_ratio: the reference pads for "pad" only, so any other value is read as "crop" (official.official_aspect).
VALUE_MAPS: dict[str, dict] = {
    "image_aspect_ratio": {"pad": "pad", "square": "crop", None: "crop"},  # LLaVA "square" = CLIP processor crop
    "vision.select_feature": {"patch": "patch", "cls_patch": "cls_patch", "default": "patch", "full": "cls_patch"},
    "projector.type": {"cluster": "cluster", "mlp2x_gelu": "mlp2x_gelu", "linear": "linear", "identity": "identity",
                       "gelu": "mlp2x_gelu"},
}

# The config.json keys the reference writes beside the LLaMA fields (docs/spec.md 6.3), with their released stage-2 values.
OFFICIAL_FIXED_KEYS: dict[str, object] = {
    "use_mm_proj": True, "image_grid_pinpoints": None, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
    "mm_use_im_start_end": False, "mm_projector_lr": 2e-5, "vision_tower_lr": 2e-5, "mm_use_im_patch_token": False,
    "qav_loss": False, "loss_alpha": 0.5, "use_cache": True,
}
