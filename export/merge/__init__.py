"""Merge the LLM-LoRA and the ViT-LoRA into the base weights (docs/spec.md 6.2) and save a plain checkpoint.

    python -m export.merge CHECKPOINT --out MERGED [--dtype float32|float16|bfloat16] [--no-validate]

W' = W + (alpha / r) * B @ A for every adapted Linear (PEFT merge_and_unload). Unlike the reference's
`merge_lora_weights.py`, which drops the ViT-LoRA (docs/spec.md 8.15), both adapters are merged. The result is a checkpoint in
our layout (docs/DESIGN.md) without adapters: `MERGED/llm` loads in transformers as a plain LlamaForCausalLM and
`MERGED/vision` as a CLIPVisionModel. Validation, on a seeded image + text probe, with adapters attached vs merged:
the vision tower's features and the LLM's logits (around the same image rows), each max |diff| <= 1e-4 (fp32;
16-bit merges are reported, not checked).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from sqllava_edge.errors import ExportValidationError

MERGED_MAX_ABS_DIFF = 1e-4
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PROBE_TEXT_TOKENS = 24  # text positions in the validation probe, around one image


def has_adapters(model) -> bool:
    return hasattr(model.llm, "peft_config") or hasattr(model.vision.clip, "peft_config")


def merge_model(model, *, validate: bool = True, log: Callable[[str], None] = print) -> dict:
    """Merge every attached PEFT adapter of an SQLLaVA in place; returns the validation numbers.

    In place so that only one copy of the weights is ever in memory (a 7B model is 13-27 GB).
    """
    if not has_adapters(model):
        return {"merged": [], "note": "no LoRA adapters: nothing to merge"}
    model.eval()
    probe = _probe(model) if validate else None
    before = _outputs(model, probe) if validate else None
    merged = []
    if hasattr(model.llm, "peft_config"):
        model.llm = model.llm.merge_and_unload()
        merged.append("llm")
    if hasattr(model.vision.clip, "peft_config"):
        model.vision.clip = model.vision.clip.merge_and_unload()
        merged.append("vision")
    report: dict = {"merged": merged}
    if validate:
        after = _outputs(model, probe, image_embeds=before[2])
        vision_diff = float((after[0] - before[0]).abs().max())
        diff = float((after[1] - before[1]).abs().max())
        dtype = next(model.llm.parameters()).dtype
        report.update(probe="seeded image + random text ids", logits_max_abs_diff=diff,
                      vision_max_abs_diff=vision_diff, dtype=str(dtype).replace("torch.", ""))
        log(f"[merge] merged {', '.join(merged)}: logits max |merged - adapters| = {diff:.3g}, vision features "
            f"{vision_diff:.3g}")
        for name, value in (("logits", diff), ("vision features", vision_diff)):
            if dtype == torch.float32 and value > MERGED_MAX_ABS_DIFF:
                raise ExportValidationError(f"merged model: tensor {name} differs from the model with adapters by "
                                            f"{value:.3g}, beyond the tolerance {MERGED_MAX_ABS_DIFF:g}")
        report["tolerance"] = ({"logits_max_abs_diff": MERGED_MAX_ABS_DIFF, "vision_max_abs_diff": MERGED_MAX_ABS_DIFF}
                               if dtype == torch.float32 else "reported (16-bit merge)")
    return report


def _probe(model) -> dict[str, torch.Tensor]:
    from sqllava_edge.config import IMAGE_TOKEN_INDEX

    config = model.config
    gen = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=gen)
    ids = torch.randint(3, config.llm.vocab_size, (PROBE_TEXT_TOKENS,), generator=gen)
    ids[0], ids[PROBE_TEXT_TOKENS // 2] = config.llm.bos_token_id, IMAGE_TOKEN_INDEX
    return {"input_ids": ids.unsqueeze(0), "pixel_values": pixels}


@torch.no_grad()
def _outputs(model, probe, image_embeds: torch.Tensor | None = None):
    """(vision tower features, LLM logits, image embeddings) on the probe. The logits are computed around
    `image_embeds` when given (the pre-merge projector output): the prototype extractor's hard assignment can flip at
    a float32 near-tie when the merged ViT's features move by rounding, which is not a merge error, so the two
    adapters are checked apart: the ViT on its continuous features, the LLM on the same image rows."""
    features = model.vision(probe["pixel_values"]).float()
    if image_embeds is None:
        image_embeds = model.encode_images(probe["pixel_values"])
    logits = model(probe["input_ids"], image_embeds=image_embeds).logits.float()
    return features, logits, image_embeds


def merge_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
    log: Callable[[str], None] = print,
) -> Path:
    """CHECKPOINT (with adapters) -> OUT, a checkpoint whose base weights include them. Written atomically."""
    from export import carried_provenance, checkpoint_digest, tool_versions
    from sqllava_edge.checkpoint import load_checkpoint, save_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    if out.resolve() == checkpoint.resolve():
        raise ValueError("--out must differ from the input checkpoint (inputs are never modified)")
    log(f"[merge] loading {checkpoint}")
    model, tokenizer = load_checkpoint(checkpoint, dtype=dtype)
    report = merge_model(model, validate=validate, log=log)
    provenance = {"merged_from": str(checkpoint.resolve()), "source_sha256": checkpoint_digest(checkpoint),
                  "merge": report, "tools": tool_versions("torch", "transformers", "peft"),
                  **carried_provenance(checkpoint)}
    log(f"[merge] saving {out}")
    return save_checkpoint(out, model, tokenizer, provenance=provenance)
