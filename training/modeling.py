"""The model side of training: which weights exist and which train in each stage (docs/spec.md 2), and the loss.

Stage 1: base LLM + vision tower frozen, the projector (prototype extractor + MLP) trains (docs/spec.md 2.3).
Stage 2: LLM-LoRA on q,k,v,o,gate,up,down of every decoder layer (docs/spec.md 2.1), ViT-LoRA on q,k,v,out,fc1,fc2 of the
encoder layers that reach the selected feature layer (docs/spec.md 2.2, 8.1), and the projector. ViT-LoRA trains unless
frozen (frozen reproduces the released weights, whose ViT-LoRA never got a gradient).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sqllava_edge.config import ModelConfig
from training.loss import RestrictedHead, lm_loss

LLM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # docs/spec.md 2.1
VIT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # docs/spec.md 2.2


def base_module(module: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in it)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def init_random_base(model, seed: int) -> None:
    """Make a randomly initialised base LLM able to express confident predictions through its frozen head.

    A frozen lm_head drawn at transformers' std 0.02 caps a logit at ~0.02 * hidden (the final RMSNorm fixes the
    hidden norm at sqrt(hidden)): 5 for the tiny preset, so no token could ever get even 1 % probability and
    sampled self-questions would be noise. A pretrained head has no such cap; we redraw the random head at
    std 1/sqrt(hidden) (a logit of up to ~sqrt(hidden) = 16 for tiny). Only ever applied to random bases.
    """
    head = base_module(model.llm).lm_head.weight
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head.copy_(torch.randn(head.shape, generator=gen) / math.sqrt(head.shape[1]))


def vit_lora_pattern(config: ModelConfig) -> str:
    """PEFT target regex: only encoder layers that run up to the selected feature layer (docs/spec.md 2.2: the rest is dead)."""
    layers = "|".join(str(i) for i in range(config.vision.layers_used))
    return rf".*encoder\.layers\.({layers})\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"


def attach_lora(model, *, r: int, alpha: int, dropout: float, vit_r: int, vit_alpha: int, vit_dropout: float) -> None:
    """Fresh LLM-LoRA and ViT-LoRA (B = 0, so the model's output is unchanged), injected in place (docs/spec.md 2.1-2.2)."""
    from peft import LoraConfig, get_peft_model

    if hasattr(model.llm, "peft_config") or hasattr(model.vision.clip, "peft_config"):
        raise ValueError("the model already carries LoRA adapters; stage 2 starts from a stage-1 checkpoint (--init)")
    llm_cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                         target_modules=list(LLM_LORA_TARGETS))
    model.llm = get_peft_model(model.llm, llm_cfg)
    if model.config.vision.layers_used > 0:
        vit_cfg = LoraConfig(r=vit_r, lora_alpha=vit_alpha, lora_dropout=vit_dropout, bias="none",
                             target_modules=vit_lora_pattern(model.config))
        model.vision.clip = get_peft_model(model.vision.clip, vit_cfg)


def model_holding(like, weights: dict[str, torch.Tensor]):
    """A model built like `like` (same config, same LoRA adapters) that holds `weights` (its full state dict, e.g.
    gathered from FSDP shards), for the checkpoint writer. Built on the meta device and assigned: nothing is copied."""
    import copy

    from peft import get_peft_model

    from sqllava_edge.model import SQLLaVA

    with torch.device("meta"):
        model = SQLLaVA.from_config(like.config)
        for owner, like_owner, attr in ((model, like, "llm"), (model.vision, like.vision, "clip")):
            like_part = getattr(like_owner, attr)
            if hasattr(like_part, "peft_config"):
                (name, adapter), = like_part.peft_config.items()  # one adapter per part (attach_lora, load_checkpoint)
                config = copy.deepcopy(adapter)
                config.base_model_name_or_path = None  # set back below; meta parts have no name (PEFT would warn)
                wrapped = get_peft_model(getattr(owner, attr), config, adapter_name=name)
                wrapped.peft_config[name].base_model_name_or_path = adapter.base_model_name_or_path
                setattr(owner, attr, wrapped)
    model.load_state_dict(weights, assign=True)
    return model


def set_trainable(model, stage: int, freeze_vit_lora: bool) -> None:
    """requires_grad per stage (docs/spec.md 2.3): the projector; in stage 2 also LLM-LoRA and, unless frozen, ViT-LoRA.
    The optimizer groups are read back from the flags by `optimizer_groups`, after any DDP/FSDP wrapping."""
    model.requires_grad_(False)
    trainable = [p for _, p in model.projector.named_parameters()]
    if stage == 2:
        llm = [p for n, p in model.llm.named_parameters() if "lora_" in n]
        if not llm:
            raise ValueError("stage 2 needs LLM-LoRA adapters but the model has none")
        trainable += llm
        if not freeze_vit_lora:
            trainable += [p for n, p in model.vision.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)


def optimizer_groups(module: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters of `module` (the model, or the DDP/FSDP-wrapped loss module) by optimizer group,
    sorted by name: "projector", "llm_lora", "vit_lora" (docs/spec.md 4.4). Taken after wrapping, because FSDP replaces
    the parameter objects."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, param in sorted(module.named_parameters()):
        if not param.requires_grad:
            continue
        group = ("projector" if ".projector." in f".{name}" else "llm_lora" if ".llm." in f".{name}"
                 else "vit_lora" if ".vision." in f".{name}" else None)
        if group is None:
            raise ValueError(f"trainable parameter {name} belongs to no optimizer group")
        groups.setdefault(group, []).append((name, param))
    return groups


def vision_trains(model) -> bool:
    return any(p.requires_grad for p in model.vision.parameters())


def fsdp_units(model) -> set[nn.Module]:
    """The modules FSDP shards as units of their own. A unit is gathered as one flat tensor, so its weights share
    one dtype: every LLM decoder layer and ViT encoder layer (frozen base, bf16 under --bf16), the projector, and
    each LoRA A and B matrix (fp32). Embeddings, final norms and the LM head stay in the root unit. Each layer is
    then gathered only while it runs, and frozen units carry no gradient (the PEFT + FSDP recipe)."""
    units: set[nn.Module] = {model.projector}
    units.update(base_module(model.llm).model.layers)
    units.update(model.vision.clip.encoder.layers)
    units.update(m for name, m in model.named_modules() if ".lora_" in name and isinstance(m, nn.Linear))
    return units


class LossModule(nn.Module):
    """One micro-batch -> (summed next-token CE, number of trained tokens). Wrapped by DDP, or sharded by FSDP.

    The loss is training.loss.lm_loss (shifted CE over non-ignored labels, docs/spec.md 1.6), whose vocabulary
    projection runs only at the labelled positions: for the tiny preset the 32000-way head over every position costs
    more than the whole rest of the model. A token prefix shared by all rows (the system prompt, a third of a tiny-preset
    sample) runs once per micro-batch. The ViT runs with grad when ViT-LoRA trains (the paper's choice, docs/spec.md 8.1), else
    without (the reference's @torch.no_grad()).

    lockstep (FSDP with per-layer units): every call runs every unit exactly once, whatever the batch holds, because
    each unit's all-gather is a collective that every rank must join in the same order. So no shared prefix (it
    runs the decoder twice), and a batch without images runs the ViT and projector on a blank image that adds 0.
    """

    def __init__(self, model, share_prefix: bool = True, lockstep: bool = False, skip_zero_rows: bool = True):
        super().__init__()
        self.model = model
        self.share_prefix = share_prefix and not lockstep  # also off with activation checkpointing (no KV cache)
        self.lockstep = lockstep
        # The head is frozen in both stages (docs/spec.md 2.3): rows that are zero now stay zero (RestrictedHead, exact). Built
        # on the head's device: setup() moves the model before it makes the loss module (under FSDP, which moves the
        # model while wrapping it, setup moves the head's index tensors after the wrap).
        self.head = RestrictedHead.of(base_module(model.llm).lm_head) if skip_zero_rows else None

    def forward(self, input_ids, labels, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        image_embeds = blank_embeds = None
        if pixel_values is not None:
            image_embeds = self._encode(pixel_values)  # (B, T, H)
        elif self.lockstep:
            size = model.config.vision.image_size
            blank_embeds = self._encode(torch.zeros(1, 3, size, size, device=model.device))  # (1, T, H)
        batch = model.prepare_inputs(input_ids, labels=labels, image_embeds=image_embeds)
        llm = base_module(model.llm)
        prefix = shared_prefix(input_ids) if self.share_prefix else 0
        hidden = decoder_hidden(llm.model, batch.inputs_embeds, batch.attention_mask, prefix)  # (B, T, H)
        loss_sum, count = lm_loss(hidden, batch.labels, llm.lm_head, self.head)
        if blank_embeds is not None:
            loss_sum = loss_sum + 0.0 * blank_embeds.float().sum()  # in the graph, so the units' backward runs too
        return loss_sum, count

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, T, H) image embeddings."""
        model = self.model
        with torch.set_grad_enabled(torch.is_grad_enabled() and vision_trains(model)):
            feats = model.vision(pixel_values.to(model.device))  # (B, T, D)
        return model.projector(feats.to(next(model.projector.parameters()).dtype))  # (B, T, H)


def decoder_hidden(decoder: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, prefix: int = 0):
    """Last hidden states (B, T, H) of a Llama decoder stack; the first `prefix` positions, identical in every row
    (see `shared_prefix`), run once and their keys/values are repeated for every row."""
    if not prefix:
        return decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = decoder(inputs_embeds=inputs_embeds[:1, :prefix], use_cache=True)  # (1, P, H)
    cache = head.cache  # transformers 5's name (past_key_values until 5.40)
    cache.batch_repeat_interleave(len(inputs_embeds))
    tail = decoder(inputs_embeds=inputs_embeds[:, prefix:], attention_mask=attention_mask, cache=cache,
                   use_cache=True).last_hidden_state  # (B, T-P, H)
    return torch.cat([head.last_hidden_state.expand(len(inputs_embeds), -1, -1), tail], dim=1)


MIN_SHARED_PREFIX = 16  # below this, computing a prefix separately saves less than it costs


def shared_prefix(input_ids) -> int:
    """Leading token ids (before any image) that every row of a batch of 2+ rows shares, e.g. the system prompt.

    One fewer than the common length, so every row keeps at least its last shared token in the second pass."""
    if len(input_ids) < 2:
        return 0
    rows = [r.tolist() if hasattr(r, "tolist") else list(r) for r in input_ids]
    length = 0
    for column in zip(*rows):
        if column[0] < 0 or any(c != column[0] for c in column):
            break
        length += 1
    length -= 1
    return length if length >= MIN_SHARED_PREFIX else 0


def load_base_parts(config: ModelConfig, llm_path: str | None, vision_path: str | None, seed: int, dtype):
    """Stage 1's model: real base weights from local HF folders, or random ones (seeded) for what is not given.

    Returns (model, base_refs): base_refs maps a part loaded from a folder to that folder, so checkpoints reference
    it instead of copying it; random parts are stored inside the checkpoint. The projector is new (random) and fp32.
    """
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from sqllava_edge.model import SQLLaVA, VisionTower, build_projector, hf_llama_config

    refs: dict[str, str] = {}

    def load(part: str, path: str | None, cls):
        if path is None:
            return None
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--{part}-base {folder} is not a transformers model folder (no config.json)")
        module = cls.from_pretrained(str(folder), dtype=dtype)
        _check_matches(part, module.config, config, folder)
        refs[part] = str(folder.resolve())
        return module

    torch.manual_seed(seed)  # same draw order as SQLLaVA.from_config: vision, projector, LLM
    vision = VisionTower(config.vision, load("vision", vision_path, CLIPVisionModel)).to(dtype)
    projector = build_projector(config)
    llm = load("llm", llm_path, LlamaForCausalLM)
    model = SQLLaVA(config, vision, projector, llm if llm is not None else LlamaForCausalLM(hf_llama_config(config.llm)).to(dtype))
    if llm is None:
        init_random_base(model, seed)
    return model, refs


def _check_matches(part: str, hf_config: Any, config: ModelConfig, folder: Path) -> None:
    if part == "llm":
        want = {"hidden_size": config.llm.hidden_size, "num_hidden_layers": config.llm.num_layers,
                "vocab_size": config.llm.vocab_size}
    else:
        want = {"hidden_size": config.vision.hidden_size, "num_hidden_layers": config.vision.num_layers,
                "image_size": config.vision.image_size, "patch_size": config.vision.patch_size}
    for key, value in want.items():
        if getattr(hf_config, key) != value:
            raise ValueError(f"{folder}: {part} {key} is {getattr(hf_config, key)} but preset {config.name!r} says "
                             f"{value}; pick the matching --preset")
