"""sqllava_edge.release (python -m sqllava_edge.convert): released layouts (docs/spec.md 6.1-6.3) written here file
by file, imported, compared by logits.

The layouts are written by this test with hand-spelled key names (not with sqllava_edge.release.names), so a wrong
rule in the name table shows up as a failed import or a logits difference.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sqllava_edge.checkpoint import base_state_dict, load_checkpoint, save_checkpoint
from sqllava_edge.config import IMAGE_TOKEN_INDEX, LLMConfig, ModelConfig, ProjectorConfig, VisionConfig, get_preset
from sqllava_edge.release.convert import convert, detect_layout, export_official, load_any, main
from sqllava_edge.errors import CheckpointError
from sqllava_edge.model import SQLLaVA, hf_clip_config

pytest.importorskip("peft", reason="LoRA adapters need peft")

# 224 px / patch 14 = 256 image tokens: the official cluster projector always pools into 256 centres (docs/spec.md 1.4).
SMALL = ModelConfig(
    "small-test",
    VisionConfig(image_size=224, patch_size=14, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2),
    ProjectorConfig(num_centers=256),
    LLMConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=2, max_position_embeddings=512),
)
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # docs/spec.md 2.1
VIT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # docs/spec.md 2.2
IDS = [1, 319, 13563, IMAGE_TOKEN_INDEX, 29871, 13, 5618, 338, 445]


def with_lora(model: SQLLaVA, llm: bool = True, vit: str | None = "trained", seed: int = 0) -> SQLLaVA:
    """Attach PEFT LoRA with random A and B (init_lora_weights=False) so every adapter changes the logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if llm:
        model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=LLM_TARGETS,
                                                         task_type="CAUSAL_LM", init_lora_weights=False))
    if vit:
        model.vision.clip = get_peft_model(model.vision.clip, LoraConfig(r=2, lora_alpha=4, target_modules=VIT_TARGETS,
                                                                         init_lora_weights=False))
        if vit == "identity":  # the released Vit-lora (docs/spec.md 8.1)
            with torch.no_grad():
                for name, p in model.vision.clip.named_parameters():
                    if "lora_B" in name:
                        p.zero_()
    return model.eval()


def logits(model, seed: int = 5) -> torch.Tensor:
    px = torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size,
                     generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(torch.tensor(IDS), pixel_values=px).logits.float()


def round_base(model: SQLLaVA, dtype: torch.dtype) -> None:
    """Round the base weights through `dtype` so that files stored in it hold exactly the model's numbers."""
    with torch.no_grad():
        for module in (model.llm, model.vision.clip):
            for name, p in module.named_parameters():
                if "lora_" not in name:
                    p.copy_(p.to(dtype).float())


def round_all(model: SQLLaVA, dtype: torch.dtype) -> None:
    """Round every parameter (base, LoRA, projector) through `dtype`: a release stored in it holds the model's numbers."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


def lora_state(module, prefix_from: str = "", prefix_to: str = "") -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    out = {}
    for key, value in get_peft_model_state_dict(module).items():
        assert key.startswith(prefix_from), key
        out[prefix_to + key[len(prefix_from):]] = value.clone()
    return out


def save_weights(state: dict, folder: Path, fmt: str, shards: int) -> None:
    """An HF-style weights folder: one file or `shards` files + index, as .bin (pickled) or .safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    stem, ext = ("pytorch_model", ".bin") if fmt == "bin" else ("model", ".safetensors")
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"{stem}{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}{ext}"
        part = {k: state[k].contiguous() for k in group}
        torch.save(part, folder / name) if fmt == "bin" else save_file(part, str(folder / name))
        weight_map.update({k: name for k in group})
    if shards > 1:
        (folder / f"{stem}{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def llama_fields(cfg: ModelConfig) -> dict:
    llm = cfg.llm
    return {"vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
            "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
            "num_key_value_heads": llm.num_kv_heads, "max_position_embeddings": llm.max_position_embeddings,
            "rms_norm_eps": llm.rms_norm_eps, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "hidden_act": "silu", "tie_word_embeddings": False, "rope_scaling": None}


def mm_config(cfg: ModelConfig, projector_type: str, tower: Path, model_type: str = "llava") -> dict:
    """config.json of a release: the LLaMA fields + the keys of docs/spec.md 6.3."""
    return {**llama_fields(cfg), "architectures": ["LlavaLlamaForCausalLM"], "model_type": model_type,
            "mm_vision_tower": str(tower), "use_mm_proj": True, "mm_projector_type": projector_type,
            "num_latents": cfg.projector.num_centers, "mm_hidden_size": cfg.vision.hidden_size,
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
            "image_grid_pinpoints": None, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
            "mm_use_im_start_end": False, "mm_projector_lr": 2e-5, "vision_tower_lr": 2e-5,
            "mm_use_im_patch_token": False, "qav_loss": False, "loss_alpha": 0.5, "use_cache": True}


def peft04_config(r: int, alpha: int, targets: list[str], task_type, base: str) -> dict:
    return {"base_model_name_or_path": base, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "lora_alpha": alpha, "lora_dropout": 0.05, "modules_to_save": None,
            "peft_type": "LORA", "r": r, "revision": None, "target_modules": targets, "task_type": task_type}


def tower_state(model: SQLLaVA, dtype: torch.dtype | None = None) -> dict:
    clip = model.vision.clip.get_base_model() if hasattr(model.vision.clip, "get_base_model") else model.vision.clip
    return {"vision_model." + k: v if dtype is None else v.to(dtype) for k, v in base_state_dict(clip).items()}


def write_clip_folder(model: SQLLaVA, folder: Path, full_clip: bool = False, position_ids: bool = False) -> Path:
    """A CLIP tower folder the way transformers 4.x saved it: vision_model.* keys (full CLIPModel: + text tower;
    position_ids: the buffer transformers < 4.31 saved, as in openai/clip-vit-large-patch14-336)."""
    state = tower_state(model)
    if position_ids:
        state["vision_model.embeddings.position_ids"] = torch.arange(model.config.num_image_tokens + 1)[None]
    vision_cfg = {**hf_clip_config(model.config.vision).to_dict(), "model_type": "clip_vision_model"}
    if full_clip:
        state.update({"text_model.embeddings.token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.tensor(2.0),
                      "visual_projection.weight": torch.randn(8, 32), "text_projection.weight": torch.randn(8, 8)})
        config = {"model_type": "clip", "architectures": ["CLIPModel"], "vision_config": vision_cfg, "text_config": {}}
    else:
        config = {**vision_cfg, "architectures": ["CLIPVisionModel"]}
    save_weights(state, folder, "bin", 1)
    (folder / "config.json").write_text(json.dumps(config))
    v = model.config.vision
    (folder / "preprocessor_config.json").write_text(json.dumps({"crop_size": v.image_size, "image_mean": list(v.image_mean),
                                                                 "image_std": list(v.image_std)}))
    return folder


def llm_base_state(model: SQLLaVA, dtype: torch.dtype) -> dict:
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    return {k: v.to(dtype) for k, v in base_state_dict(llm).items()}


def write_sqllava_release(model: SQLLaVA, root: Path, fmt: str = "bin", dtype=torch.bfloat16, shards: int = 2,
                          vit_folder: bool = True, adapter_dtype: torch.dtype | None = None,
                          extra_base: dict | None = None) -> dict[str, Path]:
    """The released SQ-LLaVA layout (docs/spec.md 6.1): ShareGPT4V base (share4v config, its own mlp projector, RoPE buffers),
    CLIP tower folder, and the LoRA folder with adapter (LLM + ViT tensors), non_lora_trainables.bin, Vit-lora/.
    adapter_dtype: LoRA, ViT-LoRA and projector tensors stored in it (DeepSpeed --bf16 saves bf16); extra_base: more
    tensors in the base's state dict."""
    cfg, ext = model.config, ".bin" if fmt == "bin" else ".safetensors"
    h, d = cfg.llm.hidden_size, cfg.vision.hidden_size
    cast = (lambda t: t) if adapter_dtype is None else (lambda t: t.to(adapter_dtype))
    base_state = {**llm_base_state(model, dtype), **(extra_base or {})}
    base_state.update({"model.mm_projector.0.weight": torch.randn(h, d).to(dtype), "model.mm_projector.0.bias": torch.randn(h).to(dtype),
                       "model.mm_projector.2.weight": torch.randn(h, h).to(dtype), "model.mm_projector.2.bias": torch.randn(h).to(dtype)})
    base_state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(cfg.llm.num_layers)})
    base = root / "ShareGPT4V-base"
    save_weights(base_state, base, fmt, shards)
    tower = write_clip_folder(model, root / "ShareGPT4V-vit")
    share4v = {**mm_config(cfg, "mlp2x_gelu", tower, model_type="share4v"), "architectures": ["Share4VLlamaForCausalLM"]}
    (base / "config.json").write_text(json.dumps(share4v))
    lora = root / "sqllava-lora"
    lora.mkdir()
    (lora / "config.json").write_text(json.dumps(mm_config(cfg, "cluster", Path("/not/downloaded/ShareGPT4V-vit"))))
    (lora / "adapter_config.json").write_text(json.dumps(peft04_config(4, 8, LLM_TARGETS, "CAUSAL_LM", "./checkpoints/x")))
    adapter = {k: cast(v) for k, v in lora_state(model.llm).items()}
    vit = {k: cast(v) for k, v in lora_state(model.vision.clip, "base_model.model.", "").items()}
    adapter.update({"base_model.model.model.vision_tower.vision_tower.vision_model." + k: v for k, v in vit.items()})
    save_weights(adapter, lora, fmt, 1)
    os.rename(lora / f"{'pytorch_model' if fmt == 'bin' else 'model'}{ext}", lora / f"adapter_model{ext}")
    torch.save({"base_model.model.model.mm_projector." + k: cast(v.clone()) for k, v in model.projector.state_dict().items()},
               lora / "non_lora_trainables.bin")
    if vit_folder:
        (lora / "Vit-lora").mkdir()
        (lora / "Vit-lora" / "adapter_config.json").write_text(json.dumps(peft04_config(2, 4, VIT_TARGETS, None, "x")))
        torch.save({"base_model.model.vision_tower.vision_model." + k: v for k, v in vit.items()},
                   lora / "Vit-lora" / "adapter_model.bin")
    return {"model": lora, "base": base, "tower": tower}


@pytest.fixture(scope="module")
def small_model() -> SQLLaVA:
    return with_lora(SQLLaVA.from_config(SMALL, seed=0), vit="trained")


def convert_sqllava(paths, out, **kw):
    return convert("sqllava", paths["model"], out, base=paths["base"], vision_tower=paths["tower"], progress=False, **kw)


@pytest.mark.parametrize("fmt,dtype,shards,vit", [("bin", torch.bfloat16, 2, "trained"),
                                                   ("safetensors", torch.float16, 3, "identity")])
def test_sqllava_release_imports_with_equal_logits(tmp_path, fmt, dtype, shards, vit):
    model = with_lora(SQLLaVA.from_config(SMALL, seed=1), vit=vit)
    round_base(model, dtype)
    expected = logits(model)
    paths = write_sqllava_release(model, tmp_path, fmt, dtype, shards)
    report = convert_sqllava(paths, tmp_path / "ours")
    loaded, _ = load_checkpoint(tmp_path / "ours")
    assert (logits(loaded) - expected).abs().max().item() <= 1e-5
    assert report.vit_lora_identity is (vit == "identity")
    text = report.text()
    assert "model.mm_projector.{rest}" in text and "base's own projector" in text  # ShareGPT4V's mlp projector
    assert "rotary_emb.inv_freq" in text and "ViT-LoRA tensors inside adapter_model" in text and "equal to" in text
    meta = json.loads((tmp_path / "ours" / "sqllava_edge.json").read_text())
    assert meta["base"] == {"llm": "llm", "vision": "vision"} and meta["lora"] == {"llm": "llm_lora", "vision": "vit_lora"}
    index = json.loads((tmp_path / "ours" / "llm" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == shards  # one output shard per input shard
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "llm" / next(iter(index["weight_map"].values()))), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == dtype  # --dtype keep


def test_float32_output_and_identity_without_vit_folder(tmp_path):
    model = with_lora(SQLLaVA.from_config(SMALL, seed=2), vit="identity")
    round_base(model, torch.float16)
    paths = write_sqllava_release(model, tmp_path, "bin", torch.float16, 1, vit_folder=False)
    report = convert_sqllava(paths, tmp_path / "ours", dtype="float32")
    loaded, _ = load_checkpoint(tmp_path / "ours")
    assert loaded.llm.get_input_embeddings().weight.dtype == torch.float32
    assert json.loads((tmp_path / "ours" / "sqllava_edge.json").read_text())["lora"]["vision"] is None
    assert "identity" in " ".join(report.ignored) and report.vit_lora_identity is None
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Release layouts as the official code really saves them: dtypes, extra keys, tokenizer files, merged and stage-1.

VICUNA_TOKENIZER_CONFIG = {  # tokenizer_config.json of lmsys/vicuna-7b-v1.5 (slow LlamaTokenizer)
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 4096,
    "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}


def write_slow_tokenizer_files(folder: Path) -> None:
    """What a slow LlamaTokenizer's save_pretrained leaves (Vicuna, ShareGPT4V, merge_lora_weights.py): the
    SentencePiece tokenizer.model and its configs, no tokenizer.json."""
    from sqllava_edge.tokenizer import default_tokenizer

    (folder / "tokenizer.model").write_bytes(default_tokenizer().spm_model)
    (folder / "tokenizer_config.json").write_text(json.dumps(VICUNA_TOKENIZER_CONFIG))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "unk_token": "<unk>", "pad_token": "<unk>"}))


def test_bf16_adapters_and_projector_keep_their_dtype_and_merge_exactly(tmp_path):
    """DeepSpeed --bf16 saves the LoRA, ViT-LoRA and projector tensors in bf16. --dtype keep writes them as they are
    (no rounding); --dtype float16 gives the official loader's fp16. Merged and attached adapters agree."""
    from safetensors.torch import load_file

    model = with_lora(SQLLaVA.from_config(SMALL, seed=14), vit="trained")
    round_all(model, torch.bfloat16)
    paths = write_sqllava_release(model, tmp_path, adapter_dtype=torch.bfloat16)
    report = convert_sqllava(paths, tmp_path / "ours")
    for name in ("llm_lora/adapter_model.safetensors", "vit_lora/adapter_model.safetensors", "projector.safetensors"):
        assert {v.dtype for v in load_file(str(tmp_path / "ours" / name)).values()} == {torch.bfloat16}, name
    lines = [line for line in report.loaded if line.startswith(("projector", "LLM-LoRA", "ViT-LoRA"))]
    assert len(lines) == 3 and all("(bfloat16)" in line for line in lines), lines
    attached, _ = load_checkpoint(tmp_path / "ours")
    merged, _ = load_checkpoint(tmp_path / "ours", merge_lora=True)
    assert not hasattr(merged.llm, "peft_config") and not hasattr(merged.vision.clip, "peft_config")
    assert (logits(attached) - logits(model)).abs().max().item() <= 1e-5
    # Merged vs attached, each adapter on its own (as export.merge validates): the prototype extractor's hard
    # assignment flips at float32 near-ties when the ViT's features move by rounding, which is not a merge error.
    px = torch.randn(1, 3, SMALL.vision.image_size, SMALL.vision.image_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (merged.vision(px) - attached.vision(px)).abs().max().item() <= 1e-5
        embeds = attached.encode_images(px)
        ids = torch.tensor(IDS)
        diff = merged(ids, image_embeds=embeds).logits - attached(ids, image_embeds=embeds).logits
    assert diff.abs().max().item() <= 1e-5
    report16 = convert_sqllava(paths, tmp_path / "fp16", dtype="float16")
    assert {v.dtype for v in load_file(str(tmp_path / "fp16" / "llm_lora" / "adapter_model.safetensors")).values()} == {
        torch.float16}
    assert any(line.startswith("LLM-LoRA") and "(bfloat16 -> float16)" in line for line in report16.loaded)


def test_base_with_tower_keys_and_clip_with_position_ids(tmp_path):
    """A ShareGPT4V base whose state dict also holds its tower (model.vision_tower.vision_tower.vision_model.*), and a
    CLIP folder with the position_ids buffer: both are skipped by named rules and the logits match."""
    model = with_lora(SQLLaVA.from_config(SMALL, seed=15), vit="trained")
    round_base(model, torch.bfloat16)
    tower_keys = {"model.vision_tower.vision_tower." + k: v for k, v in tower_state(model, torch.bfloat16).items()}
    paths = write_sqllava_release(model, tmp_path, extra_base=tower_keys)
    write_clip_folder(model, paths["tower"], position_ids=True)
    report = convert_sqllava(paths, tmp_path / "ours")
    loaded, _ = load_checkpoint(tmp_path / "ours")
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5
    ignored = "\n".join(report.ignored)
    assert f"{len(tower_keys)} tensor(s) model.vision_tower.vision_tower.vision_model.{{rest}}" in ignored
    assert "1 tensor(s) vision_model.embeddings.position_ids" in ignored


def test_tokenizer_files_in_the_base_folder(tmp_path, small_model):
    """Vicuna / ShareGPT4V bases carry the slow tokenizer's files; the official loader reads the tokenizer from
    --model-base (docs/spec.md 6.2), not from the adapter folder, and so do we."""
    from sqllava_edge.tokenizer import default_tokenizer

    paths = write_sqllava_release(small_model, tmp_path)
    write_slow_tokenizer_files(paths["base"])
    other = copy.deepcopy(default_tokenizer())
    other.hf.add_tokens(["<not-the-base-tokenizer>"])
    other.save(tmp_path / "other")
    (paths["model"] / "tokenizer.json").write_bytes((tmp_path / "other" / "tokenizer.json").read_bytes())
    report = convert_sqllava(paths, tmp_path / "ours")
    _, tokenizer = load_checkpoint(tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer" / "tokenizer.model").read_bytes() == default_tokenizer().spm_model
    assert tokenizer.vocab_size == 32000
    text = "A chat between a curious human and an artificial intelligence assistant. USER: What is shown? ASSISTANT:"
    assert tokenizer.encode(text, add_bos=True) == default_tokenizer().encode(text, add_bos=True)
    assert f"tokenizer (32000 tokens) from {paths['base']}" in report.loaded


def write_merged_folder(model: SQLLaVA, root: Path) -> dict[str, Path]:
    """A folder as scripts/merge_lora_weights.py writes it = load_pretrained_model (LLM-LoRA merged, fp16, ViT-LoRA not
    merged) + save_pretrained + tokenizer.save_pretrained (docs/spec.md 6.2) on transformers 4.31: one fp16 state dict with the
    LLM, the RoPE inv_freq buffers (persistent in 4.31, float32), the cluster projector (model.mm_projector.*, ln_1
    and the trained sim_alpha / sim_beta included) and the loaded tower (model.vision_tower.vision_tower.*), sharded
    .bin, plus the tokenizer. The tower folder is written beside it (the official reload takes it from mm_vision_tower)."""
    tower = write_clip_folder(model, root / "ShareGPT4V-7B_Pretrained_vit-large336-l12", position_ids=True)
    state = llm_base_state(model, torch.float16)
    head_dim = SMALL.llm.hidden_size // SMALL.llm.num_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv_freq for i in range(SMALL.llm.num_layers)})
    state.update({"model.mm_projector." + k: v.half() for k, v in model.projector.state_dict().items()})
    state.update({"model.vision_tower.vision_tower." + k: v.half() for k, v in tower_state(model).items()})
    folder = root / "sqllava-v1.7-7b-merged"
    save_weights(state, folder, "bin", 2)
    config = {**mm_config(SMALL, "cluster", Path("Lin-Chen/ShareGPT4V-7B_Pretrained_vit-large336-l12")),
              "torch_dtype": "float16", "transformers_version": "4.31.0"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    write_slow_tokenizer_files(folder)
    return {"model": folder, "tower": tower}


def test_merged_fp16_folder_of_merge_lora_weights(tmp_path):
    model = SQLLaVA.from_config(SMALL, seed=16).eval()
    round_all(model, torch.float16)
    paths = write_merged_folder(model, tmp_path)
    folder = paths["model"]
    assert detect_layout(folder) == "sqllava"
    report = convert("sqllava", folder, tmp_path / "ours", vision_tower=paths["tower"], progress=False)
    loaded, tokenizer = load_checkpoint(tmp_path / "ours")
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5
    assert loaded.config.projector.type == "cluster" and loaded.config.projector.keep_unused_ln
    assert any(line.startswith(f"projector (cluster): 14 tensors (float16) from model.mm_projector.* in {folder}")
               for line in report.loaded)
    assert any("model.vision_tower.vision_tower.vision_model.{rest}" in line for line in report.ignored)
    assert any("rotary_emb.inv_freq" in line and "4.31" in line for line in report.ignored)
    assert f"tokenizer (32000 tokens) from {folder}" in report.loaded and tokenizer.vocab_size == 32000
    assert report.vit_lora_identity is None
    # sim_beta of this model is its initial 0.0: the official code's value, so both choices agree (a note, no warning)
    assert any(note.startswith("sim_beta: the file holds 0.0 ") for note in report.notes) and not report.warnings


def test_merged_folder_sim_beta_file_or_official(tmp_path, capsys):
    """transformers 4.31's from_pretrained renames checkpoint keys containing "beta" to "bias", so the official code
    never loads a merged folder's model.mm_projector.sim_beta and computes with 0.0. --sim-beta file (default) keeps
    the saved value, --sim-beta official writes 0.0; the report names both values, the checkpoint and the bundle
    manifest record the choice, `sqllava-edge inspect` shows it. LoRA releases (projector via load_state_dict) keep
    their value and refuse --sim-beta official."""
    from safetensors.torch import load_file

    from export.pipeline import run_export
    from export.merge import merge_checkpoint
    from sqllava_edge.bundle import read_manifest
    from sqllava_edge.cli import main as cli_main

    model = SQLLaVA.from_config(SMALL, seed=18).eval()
    with torch.no_grad():  # trained values (the released projector's are not the initial 1.0 / 0.0)
        model.projector.sim_alpha.fill_(1.5)
        model.projector.sim_beta.fill_(-1.0)
    round_all(model, torch.float16)
    paths = write_merged_folder(model, tmp_path)
    saved = {"sim_alpha": 1.5, "c.weight": model.projector.c.weight.half()}

    report = convert("sqllava", paths["model"], tmp_path / "file", vision_tower=paths["tower"], progress=False)
    official = main(["--from", "sqllava", "--adapter", str(paths["model"]), "--vision-tower", str(paths["tower"]),
                     "--out", str(tmp_path / "official"), "--sim-beta", "official"])
    printed = capsys.readouterr().out
    expected = {"file": -1.0, "official": 0.0}
    for choice, rep in (("file", report), ("official", official)):
        projector = load_file(str(tmp_path / choice / "projector.safetensors"))
        assert projector["sim_beta"].dtype == torch.float16 and projector["sim_beta"].item() == expected[choice]
        assert projector["sim_alpha"].item() == saved["sim_alpha"] and torch.equal(projector["c.weight"], saved["c.weight"])
        meta = json.loads((tmp_path / choice / "sqllava_edge.json").read_text())
        assert meta["provenance"]["sim_beta"] == {"choice": choice, "file": -1.0, "official": 0.0,
                                                  "used": expected[choice]}
        warning, = [w for w in rep.warnings if w.startswith("sim_beta:")]
        assert "the file holds -1.0 (model.mm_projector.sim_beta)" in warning
        assert "the official code computes with 0.0," in warning and "renames keys containing 'beta' to 'bias'" in warning
        assert f"Written: {expected[choice]} (--sim-beta {choice}" in warning
        loaded, _ = load_checkpoint(tmp_path / choice)
        assert loaded.projector.sim_beta.item() == expected[choice]
    assert "warning: sim_beta: the file holds -1.0" in printed and "Written: 0.0 (--sim-beta official" in printed
    loaded, _ = load_checkpoint(tmp_path / "file")
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5  # the trained value, as the weights were trained
    official_model, _ = load_checkpoint(tmp_path / "official")
    with torch.no_grad():
        model.projector.sim_beta.zero_()
    assert (logits(official_model) - logits(model)).abs().max().item() <= 1e-5  # the official code's computation

    # The choice travels: checkpoint -> export.merge's checkpoint -> bundle manifest (a tokenizer-only export: no
    # model to convert) -> inspect.
    merge_checkpoint(tmp_path / "official", tmp_path / "merged", validate=False, log=lambda _: None)
    merged_meta = json.loads((tmp_path / "merged" / "sqllava_edge.json").read_text())
    assert merged_meta["provenance"]["sim_beta"]["choice"] == "official"
    run_export(tmp_path / "merged", tmp_path / "bundle", quants=[], vision_precisions=[], log=lambda _: None)
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest.provenance["sim_beta"]["choice"] == "official" and manifest.provenance["sim_beta"]["used"] == 0.0
    assert cli_main(["inspect", str(tmp_path / "bundle")]) == 0
    assert ("projector sim_beta: 0.0 (--sim-beta official; the release file holds -1.0, the official code computes "
            "with 0.0)") in capsys.readouterr().out

    # LoRA releases: unchanged (no sim_beta record), and --sim-beta official is refused with what to do.
    lora_model = with_lora(SQLLaVA.from_config(SMALL, seed=19), vit="identity")
    with torch.no_grad():
        lora_model.projector.sim_beta.fill_(-1.0)
    release = write_sqllava_release(lora_model, tmp_path / "lora")
    lora_report = convert_sqllava(release, tmp_path / "lora-ours")
    assert "sim_beta" not in json.loads((tmp_path / "lora-ours" / "sqllava_edge.json").read_text())["provenance"]
    assert not any("sim_beta" in line for line in lora_report.notes + lora_report.warnings)
    assert load_file(str(tmp_path / "lora-ours" / "projector.safetensors"))["sim_beta"].item() == -1.0
    with pytest.raises(CheckpointError, match=r"--sim-beta official applies to full \(merged\) SQ-LLaVA folders only;"
                                              r".*non_lora_trainables\.bin.*Leave --sim-beta at its default"):
        convert_sqllava(release, tmp_path / "refused", sim_beta="official")
    assert not (tmp_path / "refused").exists()


def test_stage1_folder_projector_and_vit_lora(tmp_path):
    """Stage 1 (docs/spec.md 6.1): config.json + mm_projector.bin (model.mm_projector.*, bf16) + Vit-lora/, no LLM weights and
    no adapter_config.json. The official loader's "mm projector only" path takes the LLM from --model-base; stage 1
    trains with the default image_aspect_ratio square (a crop)."""
    model = with_lora(SQLLaVA.from_config(SMALL, seed=17), llm=False, vit="trained")
    round_all(model, torch.bfloat16)
    vicuna = tmp_path / "vicuna-7b-v1.5"
    save_weights(llm_base_state(model, torch.bfloat16), vicuna, "bin", 2)
    (vicuna / "config.json").write_text(json.dumps({**llama_fields(SMALL), "model_type": "llama"}))
    write_slow_tokenizer_files(vicuna)
    tower = write_clip_folder(model, tmp_path / "clip-vit-large-patch14-336", position_ids=True)
    stage1 = tmp_path / "sqllava-7b-pretrain"
    stage1.mkdir()
    config = {**mm_config(SMALL, "cluster", tower), "tune_mm_mlp_adapter": True, "image_aspect_ratio": "square"}
    (stage1 / "config.json").write_text(json.dumps(config))
    torch.save({"model.mm_projector." + k: v.to(torch.bfloat16) for k, v in model.projector.state_dict().items()},
               stage1 / "mm_projector.bin")
    (stage1 / "Vit-lora").mkdir()
    (stage1 / "Vit-lora" / "adapter_config.json").write_text(json.dumps(peft04_config(2, 4, VIT_TARGETS, None, str(tower))))
    vit = lora_state(model.vision.clip, "base_model.model.", "base_model.model.vision_tower.vision_model.")
    torch.save({k: v.to(torch.bfloat16) for k, v in vit.items()}, stage1 / "Vit-lora" / "adapter_model.bin")
    (stage1 / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"projector-only \(stage-1\) folder: mm_projector\.bin; pass .* --base"):
        convert("sqllava", stage1, tmp_path / "x", progress=False)
    report = convert("sqllava", stage1, tmp_path / "ours", base=vicuna, progress=False)
    loaded, _ = load_checkpoint(tmp_path / "ours")
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5
    meta = json.loads((tmp_path / "ours" / "sqllava_edge.json").read_text())
    assert meta["lora"] == {"llm": None, "vision": "vit_lora"} and meta["config"]["image_aspect_ratio"] == "crop"
    assert report.vit_lora_identity is False and f"tokenizer (32000 tokens) from {vicuna}" in report.loaded


def test_liuhaotian_full_model_with_full_clip_folder(tmp_path):
    cfg = SMALL.replace(projector=ProjectorConfig(type="mlp2x_gelu", keep_unused_ln=False), template="v1")
    model = SQLLaVA.from_config(cfg, seed=3).eval()
    tower = write_clip_folder(model, tmp_path / "clip-vit-large-patch14-336", full_clip=True)
    state = llm_base_state(model, torch.float32)
    state.update({"model.mm_projector." + k: v for k, v in model.projector.state_dict().items()})
    folder = tmp_path / "llava-v1.5"
    save_weights(state, folder, "safetensors", 2)
    (folder / "config.json").write_text(json.dumps(mm_config(cfg, "mlp2x_gelu", tower)))
    assert detect_layout(folder) == "llava"
    report = convert("llava", folder, tmp_path / "ours", progress=False)  # base and tower resolved from config.json
    loaded, _ = load_checkpoint(tmp_path / "ours")
    assert loaded.config.template == "v1" and loaded.config.projector.type == "mlp2x_gelu"
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5
    assert any("text_model" in line for line in report.ignored)


def test_liuhaotian_lora_with_referenced_vicuna_base(tmp_path):
    cfg = SMALL.replace(projector=ProjectorConfig(type="mlp2x_gelu", keep_unused_ln=False))
    model = with_lora(SQLLaVA.from_config(cfg, seed=4), vit=None)
    vicuna = tmp_path / "vicuna"
    save_weights(llm_base_state(model, torch.float32), vicuna, "safetensors", 1)
    (vicuna / "config.json").write_text(json.dumps({**llama_fields(cfg), "model_type": "llama"}))
    tower = write_clip_folder(model, tmp_path / "clip")
    (tower / "config.json").write_text(json.dumps({**hf_clip_config(cfg.vision).to_dict()}))
    lora = tmp_path / "llava-v1.5-lora"
    lora.mkdir()
    (lora / "config.json").write_text(json.dumps(mm_config(cfg, "mlp2x_gelu", tower)))
    (lora / "adapter_config.json").write_text(json.dumps(peft04_config(4, 8, LLM_TARGETS, "CAUSAL_LM", str(vicuna))))
    torch.save(lora_state(model.llm), lora / "adapter_model.bin")
    torch.save({"base_model.model.model.mm_projector." + k: v for k, v in model.projector.state_dict().items()},
               lora / "non_lora_trainables.bin")
    convert("llava", lora, tmp_path / "ours", base_weights="auto", progress=False)
    meta = json.loads((tmp_path / "ours" / "sqllava_edge.json").read_text())
    assert meta["base"] == {"llm": str(vicuna.resolve()), "vision": str(tower.resolve())}  # referenced, not copied
    assert not (tmp_path / "ours" / "llm").exists()
    loaded, _ = load_any(lora)  # same folder through the PyTorch-backend entry point
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5


def test_llava_hf_matches_transformers(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from sqllava_edge.model import hf_llama_config

    from sqllava_edge.tokenizer import default_tokenizer

    # As llava-hf/llava-1.5-7b-hf: "<image>" = 32000 and "<pad>" = 32001 added, embeddings padded to 32064 rows.
    image_token = 32000
    text = hf_llama_config(SMALL.llm.__class__(**{**vars(SMALL.llm), "vocab_size": 32064})).to_dict()
    hf_cfg = LlavaConfig(vision_config=hf_clip_config(SMALL.vision).to_dict(), text_config=text,
                         image_token_id=image_token, projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=SMALL.num_image_tokens)
    torch.manual_seed(6)
    hf = LlavaForConditionalGeneration(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "llava-hf")
    tok = copy.deepcopy(default_tokenizer().hf)
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(tmp_path / "llava-hf")
    assert detect_layout(tmp_path / "llava-hf") == "llava-hf"
    report = convert("llava-hf", tmp_path / "llava-hf", tmp_path / "ours", progress=False)
    ours, tokenizer = load_checkpoint(tmp_path / "ours")
    assert ours.config.projector.type == "mlp2x_gelu" and ours.config.vision.select_layer == -2
    assert ours.config.llm.vocab_size == 32064 and tokenizer.vocab_size == 32002
    px = torch.randn(1, 3, SMALL.vision.image_size, SMALL.vision.image_size)
    before, after = IDS[:3], IDS[4:]
    with torch.no_grad():
        mine = ours(torch.tensor(before + [IMAGE_TOKEN_INDEX] + after), pixel_values=px).logits
        theirs = hf(input_ids=torch.tensor([before + [image_token] * SMALL.num_image_tokens + after]), pixel_values=px).logits
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() <= 1e-5
    assert report.ignored == [] and report.vit_lora_identity is None  # every llava-hf tensor has a place


def test_round_trip_ours_official_ours_is_identical(tmp_path):
    from safetensors.torch import load_file

    model = with_lora(SQLLaVA.from_config(SMALL, seed=7), vit="trained")
    save_checkpoint(tmp_path / "ours", model)
    export_official(tmp_path / "ours", tmp_path / "official", max_shard_bytes=2 << 20)
    official = tmp_path / "official"
    assert (official / "base" / "pytorch_model.bin.index.json").is_file()  # sharded base, as released
    assert {"adapter_config.json", "adapter_model.bin", "non_lora_trainables.bin", "config.json"} <= {
        p.name for p in official.iterdir()}
    assert json.loads((official / "config.json").read_text())["mm_projector_type"] == "cluster"
    convert("sqllava", official, tmp_path / "again", progress=False)  # base + tower found through the configs
    first = json.loads((tmp_path / "ours" / "sqllava_edge.json").read_text())
    second = json.loads((tmp_path / "again" / "sqllava_edge.json").read_text())
    assert {**first["config"], "name": ""} == {**second["config"], "name": ""} and first["lora"] == second["lora"]
    for part in ("llm", "vision", "llm_lora", "vit_lora"):
        a, b = _folder_tensors(tmp_path / "ours" / part), _folder_tensors(tmp_path / "again" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    for name in ("llm_lora", "vit_lora"):
        ca, cb = (json.loads((tmp_path / d / name / "adapter_config.json").read_text()) for d in ("ours", "again"))
        assert {k: ca[k] for k in ("r", "lora_alpha", "task_type")} == {k: cb[k] for k in ("r", "lora_alpha", "task_type")}
        assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])
    pa, pb = load_file(str(tmp_path / "ours" / "projector.safetensors")), load_file(str(tmp_path / "again" / "projector.safetensors"))
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    loaded, _ = load_any(official)
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5


def _folder_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file if unpickled


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused_not_run(tmp_path, small_model, how):
    paths = write_sqllava_release(small_model, tmp_path)
    marker = tmp_path / "pwned"
    target = paths["model"] / "non_lora_trainables.bin"
    if how == "torch.save":
        torch.save({"base_model.model.model.mm_projector.c.weight": _Evil(marker)}, target)
    else:
        target.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refusing to load .*non_lora_trainables\.bin.*GLOBAL io\.open\)"):
        convert_sqllava(paths, tmp_path / "ours")
    assert not marker.exists() and not (tmp_path / "ours").exists()


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _missing_projector(paths):
    (paths["model"] / "non_lora_trainables.bin").unlink()


def _missing_shard(paths):
    (paths["base"] / "pytorch_model-00002-of-00002.bin").unlink()


def _lora_shape(paths):
    state = torch.load(paths["model"] / "adapter_model.bin", weights_only=True)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(4, 48)
    torch.save(state, paths["model"] / "adapter_model.bin")


def _lora_rank(paths):
    _edit_json(paths["model"] / "adapter_config.json", r=8)


def _lora_extra_layer(paths):
    state = torch.load(paths["model"] / "adapter_model.bin", weights_only=True)
    state["base_model.model.model.layers.7.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    torch.save(state, paths["model"] / "adapter_model.bin")


def _projector_type(paths):
    _edit_json(paths["model"] / "config.json", mm_projector_type="resampler")


def _vocab_config(paths):
    _edit_json(paths["model"] / "config.json", vocab_size=32001)


def _vocab_rows(paths):
    for folder in (paths["model"], paths["base"]):
        _edit_json(folder / "config.json", vocab_size=32001)


def _other_tower(paths):
    _edit_json(paths["tower"] / "config.json", hidden_size=48)


@pytest.mark.parametrize("damage,message", [
    (_missing_projector, r"missing file .*non_lora_trainables\.bin"),
    (_missing_shard, r"missing: pytorch_model-00002-of-00002\.bin"),
    (_lora_shape, r"adapter/base mismatch: LLM-LoRA tensor base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_A"
                  r"\.weight has shape \(4, 48\)"),
    (_lora_rank, r"adapter/base mismatch: .* has rank 4 but .* says r=8"),
    (_lora_extra_layer, r"adapter/base mismatch: .*targets model\.layers\.7\.mlp\.up_proj"),
    (_projector_type, r"unknown projector type 'resampler'"),
    (_vocab_config, r"vocab size mismatch: .*ShareGPT4V-base/config\.json says vocab_size=32000"),
    (_vocab_rows, r"vocab size mismatch: .*(embed_tokens|lm_head)\.weight has 32000 rows .*vocab_size=32001"),
    (_other_tower, r"mm_hidden_size=32 but the vision tower is 48 wide"),
])
def test_clear_errors(tmp_path, small_model, damage, message):
    paths = write_sqllava_release(small_model, tmp_path)
    damage(paths)
    with pytest.raises(CheckpointError, match=message):
        convert_sqllava(paths, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()  # nothing half-written


# ----------------------------------------------------------------------------------------------------------------
# Config settings: honoured as the official loader (sqllava/model/builder.py) reads them, or refused; never ignored.


def _release_with_config(tmp_path, seed: int = 11, vit: str | None = "trained", vit_folder: bool = True, **config):
    """A bf16 release of a fresh model whose base numbers are exactly the stored ones, its config.json edited:
    a value None removes the key. -> (model, paths)."""
    model = with_lora(SQLLaVA.from_config(SMALL, seed=seed), vit=vit)
    round_base(model, torch.bfloat16)
    paths = write_sqllava_release(model, tmp_path, vit_folder=vit_folder)
    cfg = json.loads((paths["model"] / "config.json").read_text())
    cfg.update({k: v for k, v in config.items() if v is not None})
    for key in [k for k, v in config.items() if v is None]:
        del cfg[key]
    (paths["model"] / "config.json").write_text(json.dumps(cfg))
    return model, paths


@pytest.mark.parametrize("setting", ["missing", True, False])
def test_mm_use_im_patch_token_adds_the_token_and_a_row(tmp_path, setting):
    """Official loader: add <im_patch> when mm_use_im_patch_token is on (default True when the key is missing), then
    resize_token_embeddings(len(tokenizer)): one more token, one more embedding and lm_head row."""
    from sqllava_edge.tokenizer import default_tokenizer

    model, paths = _release_with_config(tmp_path, mm_use_im_patch_token=None if setting == "missing" else setting)
    report = convert_sqllava(paths, tmp_path / "ours")
    loaded, tokenizer = load_checkpoint(tmp_path / "ours")
    added = setting is not False
    assert loaded.config.llm.vocab_size == tokenizer.vocab_size == 32000 + added
    assert (tokenizer.hf.convert_tokens_to_ids("<im_patch>") == 32000) is added  # in the vocabulary...
    assert 32000 not in tokenizer.encode("<im_patch>")  # ...but typed text never becomes it
    assert default_tokenizer().vocab_size == 32000  # the shared default tokenizer is not changed
    got, want = logits(loaded), logits(model)
    assert (got[..., :32000] - want).abs().max().item() <= 1e-5
    if added:
        for weights in (loaded.llm.get_input_embeddings().weight, loaded.llm.get_output_embeddings().weight):
            assert torch.allclose(weights[32000], weights[:32000].mean(0), atol=1e-6)
        assert "<im_patch> = id 32000" in report.text()


def test_mm_use_im_start_end_is_refused_with_what_to_do(tmp_path, small_model):
    paths = write_sqllava_release(small_model, tmp_path)
    _edit_json(paths["model"] / "config.json", mm_use_im_start_end=True)
    with pytest.raises(CheckpointError, match=r"mm_use_im_start_end=true: .*<im_start><image><im_end>.*"
                                              r"set \"mm_use_im_start_end\": false in config\.json"):
        convert_sqllava(paths, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("value,mode,warned", [("pad", "pad", False), ("square", "crop", False), (None, "crop", False),
                                               ("anyres", "crop", True), ("keep", "crop", True)])
def test_image_aspect_ratio_anything_but_pad_is_a_centre_crop(value, mode, warned):
    """mm_utils.process_images pads for "pad" and hands every other value to the CLIP processor (resize + crop)."""
    from sqllava_edge.release.official import official_aspect

    warnings: list[str] = []
    assert official_aspect(value, "sqllava", Path("config.json"), warnings) == mode
    assert bool(warnings) is warned and all("centre crop" in w for w in warnings)


def test_image_aspect_ratio_in_a_release_and_anyres_in_llava(tmp_path, caplog):
    _, paths = _release_with_config(tmp_path, image_aspect_ratio="anyres")
    with caplog.at_level("WARNING", logger="sqllava_edge.release.convert"):
        report = convert_sqllava(paths, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "sqllava_edge.json").read_text())["config"]["image_aspect_ratio"] == "crop"
    assert any("image_aspect_ratio='anyres'" in w for w in report.warnings)
    assert "image_aspect_ratio='anyres'" in caplog.text
    from sqllava_edge.release.official import official_aspect

    with pytest.raises(CheckpointError, match="LLaVA-NeXT"):  # liuhaotian's anyres is tiling, not a crop
        official_aspect("anyres", "llava", Path("config.json"), [])


def test_num_latents_is_not_the_number_of_centres(tmp_path):
    """The reference builds Clustering(..., 256, 2) whatever num_latents says; no projector tensor depends on it."""
    model, paths = _release_with_config(tmp_path, num_latents=64)
    report = convert_sqllava(paths, tmp_path / "ours")
    loaded, _ = load_checkpoint(tmp_path / "ours")
    assert loaded.config.projector.num_centers == 256 and loaded.projector.num_centers == 256
    assert (logits(loaded) - logits(model)).abs().max().item() <= 1e-5
    assert any("num_latents=64" in w and "ignored" in w for w in report.warnings)


def test_export_official_refuses_other_than_256_centres(tmp_path):
    cfg = SMALL.replace(projector=ProjectorConfig(num_centers=16))
    save_checkpoint(tmp_path / "ours", SQLLaVA.from_config(cfg, seed=0))
    with pytest.raises(CheckpointError, match="hard-codes 256 centres .*this model uses 16"):
        export_official(tmp_path / "ours", tmp_path / "official", include_base=False)
    assert not (tmp_path / "official").exists()


def test_trained_vit_lora_in_adapter_without_vit_folder_is_ignored_with_a_warning(tmp_path, caplog):
    """Official loader: the ViT-LoRA tensors of adapter_model.bin find no module (the tower is built later), so the
    tower runs without them (docs/spec.md 6.2 / 8.15). We do the same and say so."""
    model, paths = _release_with_config(tmp_path, vit="trained", vit_folder=False)
    with caplog.at_level("WARNING", logger="sqllava_edge.release.convert"):
        report = convert_sqllava(paths, tmp_path / "ours")
    loaded, _ = load_checkpoint(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "sqllava_edge.json").read_text())["lora"]["vision"] is None
    with model.vision.clip.disable_adapter():
        want = logits(model)
    assert (logits(loaded) - want).abs().max().item() <= 1e-5
    assert (logits(loaded) - logits(model)).abs().max().item() > 1e-3  # the ViT-LoRA did change the features
    assert report.vit_lora_identity is None and any("trained ViT-LoRA" in line for line in report.ignored)
    assert "trained ViT-LoRA tensors" in caplog.text and "Vit-lora" in report.warnings[0]


def test_layout_detection_and_cli(tmp_path, small_model, capsys):
    paths = write_sqllava_release(small_model, tmp_path)
    assert detect_layout(paths["model"]) == "sqllava"
    with pytest.raises(CheckpointError, match="not llava-hf"):
        convert("llava-hf", paths["model"], tmp_path / "x", progress=False)
    with pytest.raises(CheckpointError, match="pass its base LLM with --base"):
        convert("sqllava", paths["model"], tmp_path / "x", vision_tower=paths["tower"], progress=False)
    with pytest.raises(CheckpointError, match="cannot tell the layout"):
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain" / "config.json").write_text(json.dumps({"model_type": "llama"}))
        detect_layout(tmp_path / "plain")
    report = main(["--from", "sqllava", "--adapter", str(paths["model"]), "--base", str(paths["base"]),
                   "--vision-tower", str(paths["tower"]), "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert "ViT-LoRA identity: no" in out and report.vit_lora_identity is False
    with pytest.raises(SystemExit):
        main(["--from", "sqllava", "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")])
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Streaming: peak memory of converting a sqllava-7b-shaped release (real widths, fewer layers), in a subprocess.

_MEASURE = textwrap.dedent("""
    import json, resource, sys, psutil
    from sqllava_edge.release.convert import convert
    import transformers, peft, safetensors  # imports before the baseline
    from sqllava_edge.release.convert import _shapes
    from sqllava_edge.config import get_preset
    _shapes(get_preset("tiny"))  # warm the module imports used during conversion
    base_rss = psutil.Process().memory_info().rss
    paths = json.loads(sys.argv[1])
    convert("sqllava", paths["model"], paths["out"], base=paths["base"], vision_tower=paths["tower"], progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base_rss": base_rss, "peak": peak}))
""")


def _write_real_width_release(root: Path, layers: int) -> tuple[dict, list[int]]:
    """sqllava-7b widths (4096 / 11008 / 32000 vocab, CLIP-L 1024) in fp16, `layers` LLM + 2 CLIP layers, one shard
    per LLM layer plus the embedding and head shards; tensors are written one shard at a time."""
    from safetensors.torch import save_file

    cfg = get_preset("sqllava-7b")
    cfg = cfg.replace(llm=LLMConfig(**{**vars(cfg.llm), "num_layers": layers}),
                      vision=VisionConfig(**{**vars(cfg.vision), "num_layers": 2, "select_layer": -1}))
    from transformers import LlamaForCausalLM

    from sqllava_edge.model import hf_llama_config
    from sqllava_edge.release.weights import expected_shapes

    shapes = expected_shapes(lambda: LlamaForCausalLM(hf_llama_config(cfg.llm)))
    groups = [["model.embed_tokens.weight"]] + [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append(["model.norm.weight", "lm_head.weight"])
    base, sizes, weight_map = root / "base", [], {}
    base.mkdir(parents=True)
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        part = {k: torch.full(shapes[k], 0.01, dtype=torch.float16) for k in group}
        save_file(part, str(base / name))
        sizes.append(sum(t.numel() * 2 for t in part.values()))
        weight_map.update({k: name for k in group})
        del part
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({**llama_fields(cfg), "model_type": "llama"}))
    tower = root / "tower"
    with torch.device("meta"):
        from transformers import CLIPVisionModel

        meta_clip = CLIPVisionModel(hf_clip_config(cfg.vision))
    save_weights({"vision_model." + k: torch.zeros(v.shape, dtype=torch.float16) for k, v in meta_clip.state_dict().items()},
                 tower, "safetensors", 1)
    (tower / "config.json").write_text(json.dumps(hf_clip_config(cfg.vision).to_dict()))
    lora = root / "lora"
    lora.mkdir()
    (lora / "config.json").write_text(json.dumps({**mm_config(cfg, "cluster", tower), "mm_vision_select_layer": -1}))
    from sqllava_edge.model import build_projector

    with torch.device("meta"):
        proj = build_projector(cfg).state_dict()
    torch.save({"base_model.model.model.mm_projector." + k: torch.zeros(v.shape, dtype=torch.float16) for k, v in proj.items()},
               lora / "non_lora_trainables.bin")
    return {"model": str(lora), "base": str(base), "tower": str(tower), "out": str(root / "out")}, sizes


def test_conversion_streams_one_shard_at_a_time(tmp_path):
    layers = int(os.environ.get("SQLLAVA_EDGE_CONVERT_LAYERS", "2"))  # 32 = the full 7B (27 GB of disk)
    paths, sizes = _write_real_width_release(tmp_path, layers)
    run = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(paths)], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    numbers = json.loads(run.stdout.strip().splitlines()[-1])
    extra, largest, total = numbers["peak"] - numbers["base_rss"], max(sizes), sum(sizes)
    print(f"\nstreaming: {len(sizes)} LLM shards, total {total / 2**30:.2f} GiB, largest {largest / 2**20:.0f} MiB, "
          f"peak RSS above baseline {extra / 2**20:.0f} MiB ({extra / largest:.2f} x largest shard)")
    assert extra < 2.5 * largest  # one input shard + the output shard being written, never the whole model
    assert extra < 0.6 * total
