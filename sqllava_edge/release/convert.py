"""Import released SQ-LLaVA, liuhaotian LLaVA-1.5 and llava-hf folders into a sqllava-edge checkpoint.

    python -m sqllava_edge.convert --from sqllava --adapter sqllava-lora-7b --base ShareGPT4V-7B_..._vicuna-7b-v1.5 \
        --vision-tower ShareGPT4V-7B_Pretrained_vit-large336-l12 --out checkpoints/sqllava-7b

Spec: docs/spec.md 6.1-6.3 (files, loading, config keys), 8.1 (identity ViT-LoRA), 8.5 (ShareGPT4V base), 8.15
(ViT-LoRA tensors inside adapter_model.bin). Names: sqllava_edge.release.names. Everything is checked before anything is
written; weights stream one input shard at a time; the output folder appears atomically. `load_any(folder)` opens
any of these layouts (or our own checkpoint) for the PyTorch backend.

Where the official loader (sqllava/model/builder.py) reads a setting differently from what its name says, we follow
the loader and say so in the report's warnings: num_latents (256 centres), image_aspect_ratio (anything but pad is a
crop), mm_use_im_patch_token (default on: one more token), ViT-LoRA tensors in adapter_model.bin (unused).
One setting the official code does not read at all: a full (merged) SQ-LLaVA folder's model.mm_projector.sim_beta
(transformers 4.31's from_pretrained renames keys containing "beta" to "bias", so the official model runs with 0.0);
`--sim-beta file` (default) keeps the saved value, `--sim-beta official` writes 0.0. The choice is recorded in the
checkpoint's provenance and travels into the bundle manifest.
Dtypes: `--dtype keep` writes every tensor as the release stores it (bf16 LoRA and projector stay bf16, nothing is
rounded); the official loader ends with fp16 weights (projector cast, LoRA merged into the fp16 LLM): `--dtype
float16` writes fp16.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import re
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from sqllava_edge.checkpoint import FORMAT, META_FILE, VERSION
from sqllava_edge.config import ModelConfig
from sqllava_edge.errors import CheckpointError
from sqllava_edge.release.names import WEIGHT_STEMS, to_ours
from sqllava_edge.release.official import (added_tokens, export_official, lora_config_fields, llava_hf_model_config,
                                           official_model_config, read_json)
# torch: the importer reads and writes tensors (without it, `python -m sqllava_edge.convert` names the extra in a line)
from sqllava_edge.release.weights import DTYPES, ShardWriter, TensorFile, expected_shapes, find_weights, iter_tensors

__all__ = ["convert", "export_official", "load_any", "detect_layout", "Report", "main"]
log = logging.getLogger(__name__)

KINDS = ("sqllava", "llava", "llava-hf")
SIM_BETA_CHOICES = ("file", "official")  # merged SQ-LLaVA folders: the saved sim_beta, or 0.0 as the official code runs
OFFICIAL_SIM_BETA = 0.0  # the value the official code computes with (the parameter's initial value; never loaded)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what sqllava_edge.tokenizer.load_tokenizer reads
OFFICIAL_KEYS = ("mm_vision_tower", "mm_projector_type", "mm_hidden_size")  # docs/spec.md 6.3: marks an official config.json


@dataclass
class Report:
    """What a conversion read, what it deliberately left out, and whether the ViT-LoRA does anything (docs/spec.md 8.1)."""

    kind: str
    out: str = ""
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # where a setting is read as the official loader reads it
    vit_lora_identity: bool | None = None  # None: no ViT-LoRA

    def warn(self, text: str) -> None:
        log.warning("%s", text)
        self.warnings.append(text)

    def text(self) -> str:
        lines = [f"converted {self.kind} -> {self.out}", "loaded:"] + [f"  - {x}" for x in self.loaded]
        lines += ["ignored:"] + [f"  - {x}" for x in self.ignored or ["nothing"]]
        identity = {None: "no ViT-LoRA", True: "yes: every lora_B is 0, the adapter changes nothing (docs/spec.md 8.1)",
                    False: "no: the ViT-LoRA changes the vision features"}[self.vit_lora_identity]
        lines += [f"ViT-LoRA identity: {identity}"] + [f"note: {x}" for x in self.notes]
        lines += [f"warning: {x}" for x in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Adapter:
    fields: dict[str, Any]  # LoraConfig fields (r, lora_alpha, target_modules, ...)
    tensors: dict  # our PEFT keys -> tensor
    source: str


@dataclass
class Plan:
    """Everything a conversion reads, resolved and checked before writing starts."""

    kind: str
    config: ModelConfig
    streams: list[tuple[list[Path], str]]  # (weight files, names layout) read one shard at a time
    folders: dict[str, Path]  # "llm" / "vision": where the base weights live (for referencing them in place)
    projector: dict | None  # None: projector tensors come from the streams (full LLaVA / llava-hf)
    projector_source: str
    llm_overrides: dict = field(default_factory=dict)  # trained LLM tensors from non_lora_trainables.bin
    llm_lora: Adapter | None = None
    vit_lora: Adapter | None = None
    tokenizer_dir: Path | None = None
    added_tokens: list[str] = field(default_factory=list)  # tokens the official loader adds (mm_use_im_patch_token)
    added_rows: int = 0  # embedding / lm_head rows appended for them (set when the tokenizer is read)
    ignore_reasons: dict[str, str] = field(default_factory=dict)  # part -> why the streams' tensors of it are skipped
    report: Report | None = None
    # True when the official code loads the projector with from_pretrained (a full folder's model.mm_projector.*),
    # whose key renaming drops sim_beta; False when it comes from a .bin read with load_state_dict (keeps it).
    projector_from_pretrained: bool = False
    sim_beta: str = "file"  # SIM_BETA_CHOICES; acts on projector_from_pretrained cluster projectors only


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking the sources


def _local_ref(folder: Path, ref: str | None) -> Path | None:
    """A folder named in a config (mm_vision_tower, base_model_name_or_path) when it exists locally, else None."""
    if not ref:
        return None
    path = Path(ref).expanduser()
    for candidate in (path, folder / path):
        if (candidate / "config.json").is_file():
            return candidate.resolve()
    return None


def _has_weights(folder: Path) -> bool:
    """Whether `folder` has HF weight files or an index of them (find_weights then says what is wrong with them)."""
    return any((folder / f"{stem}{suffix}{index}").is_file() for stem in WEIGHT_STEMS
               for suffix in (".safetensors", ".bin") for index in ("", ".index.json"))


def _tokenizer_dir(*folders: Path) -> Path | None:
    for folder in folders:
        if folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    return None


def _split(layout: str, tensors: dict, source: str) -> dict[str, dict]:
    parts: dict[str, dict] = {}
    for key, value in tensors.items():
        mapped = to_ours(layout, key)
        if mapped is None:
            raise CheckpointError(f"{source}: unexpected tensor {key}; this file does not follow the {layout} layout")
        parts.setdefault(mapped[0], {})[mapped[1]] = value
    return parts


def _read_tensors(path: Path) -> dict:
    with TensorFile(path) as handle:
        return {key: handle.get(key) for key in handle.keys()}


def _adapter_file(folder: Path) -> Path:
    for name in ("adapter_model.safetensors", "adapter_model.bin"):  # safetensors first
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder} has adapter_config.json but no adapter_model.safetensors or adapter_model.bin")


def check_lora(adapter: Adapter, base_shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every LoRA A/B pair must fit a Linear of the base: A (r, in), B (out, r), r as configured (docs/spec.md 2.1/2.2)."""
    rank, patterned = adapter.fields["r"], bool(adapter.fields.get("rank_pattern"))
    for key, tensor in sorted(adapter.tensors.items()):
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise CheckpointError(f"{adapter.source}: {what} tensor {key} is not a LoRA A/B weight")
        module, which = match.groups()
        base = base_shapes.get(f"{module}.weight")
        if base is None or len(base) != 2:
            raise CheckpointError(f"adapter/base mismatch: {what} tensor {key} targets {module}, which the base model does "
                                  f"not have as a Linear; the adapter was trained on another model ({adapter.source})")
        r = tensor.shape[0] if which == "A" else tensor.shape[-1]
        want = (r, base[1]) if which == "A" else (base[0], r)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"adapter/base mismatch: {what} tensor {key} has shape {tuple(tensor.shape)} but the base "
                                  f"weight {module}.weight is {base}, so it must be {want}; the adapter belongs to another base")
        if not patterned and r != rank:
            raise CheckpointError(f"adapter/base mismatch: {what} tensor {key} has rank {r} but {adapter.source} "
                                  f"says r={rank}")
        partner = key[: -len("A.weight")] + ("B.weight" if which == "A" else "A.weight")
        if partner not in adapter.tensors:
            raise CheckpointError(f"{adapter.source}: {what} tensor {key} has no partner {partner}; the file is incomplete")


def is_identity(adapter: Adapter) -> bool:
    """All lora_B == 0: the adapter adds nothing (the released Vit-lora, docs/spec.md 8.1)."""
    import torch

    return all(int(torch.count_nonzero(v)) == 0 for k, v in adapter.tensors.items() if ".lora_B." in k)


def _shapes(config: ModelConfig, parts=("llm", "vision", "projector")) -> dict[str, dict[str, tuple[int, ...]]]:
    """Names and shapes our modules expect for `config`, built on the meta device."""
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from sqllava_edge.model import build_projector, hf_clip_config, hf_llama_config

    factories = {"llm": lambda: LlamaForCausalLM(hf_llama_config(config.llm)),
                 "vision": lambda: CLIPVisionModel(hf_clip_config(config.vision)),
                 "projector": lambda: build_projector(config)}
    return {part: expected_shapes(factories[part]) for part in parts}


def check_projector(config: ModelConfig, tensors: dict, source: str) -> ModelConfig:
    """Projector tensors must be exactly the configured projector's (docs/spec.md 1.4.1); -> config with ln_1 kept if present."""
    if config.projector.type == "cluster":
        has_ln = "ln_1.weight" in tensors  # the unused ln_1 is in the reference state dict (docs/spec.md 1.4.1)
        config = config.replace(projector=dataclasses.replace(config.projector, keep_unused_ln=has_ln))
    own = _shapes(config, ("projector",))["projector"]
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{source}: projector tensors do not match mm_projector_type={config.projector.type!r} "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]}); unknown projector type or wrong file")
    for key, value in tensors.items():
        if tuple(value.shape) != own[key]:
            raise CheckpointError(f"{source}: projector tensor {key} has shape {tuple(value.shape)}, the config needs {own[key]}")
    return config


def _check_base_config(config: ModelConfig, base_dir: Path) -> None:
    """The base LLM's config.json (LLaMA or ShareGPT4V's share4v, docs/spec.md 8.5) must have the adapter config's shape."""
    base = read_json(base_dir / "config.json")
    for key, ours in (("vocab_size", config.llm.vocab_size), ("hidden_size", config.llm.hidden_size),
                      ("num_hidden_layers", config.llm.num_layers), ("intermediate_size", config.llm.intermediate_size),
                      ("num_attention_heads", config.llm.num_heads)):
        if key in base and base[key] != ours:
            what = "vocab size mismatch" if key == "vocab_size" else "adapter/base mismatch"
            raise CheckpointError(f"{what}: {base_dir / 'config.json'} says {key}={base[key]} but the model's config.json "
                                  f"says {ours}; --base is not the base this model was trained on")


def _plan_adapters(plan: Plan, model_dir: Path, shapes: dict) -> None:
    """LLM-LoRA from adapter_model.*, ViT-LoRA from Vit-lora/ (the copy inside adapter_model.* is compared, then dropped)."""
    report = plan.report
    embedded: dict = {}
    if (model_dir / "adapter_config.json").is_file():
        fields = lora_config_fields(read_json(model_dir / "adapter_config.json"), model_dir / "adapter_config.json")
        path = _adapter_file(model_dir)
        parts = _split("official_adapter", _read_tensors(path), str(path))
        plan.llm_lora = Adapter({**fields, "task_type": "CAUSAL_LM"}, parts.get("llm_lora", {}), str(path))
        check_lora(plan.llm_lora, shapes["llm"], "LLM-LoRA")
        embedded = parts.get("vit_lora", {})
    vit_dir = model_dir / "Vit-lora"
    if (vit_dir / "adapter_config.json").is_file():
        fields = lora_config_fields(read_json(vit_dir / "adapter_config.json"), vit_dir / "adapter_config.json")
        path = _adapter_file(vit_dir)
        tensors = _split("official_vit_adapter", _read_tensors(path), str(path)).get("vit_lora", {})
        plan.vit_lora = Adapter({**fields, "task_type": None}, tensors, str(path))
        check_lora(plan.vit_lora, shapes["vision"], "ViT-LoRA")
    if embedded:
        import torch

        if plan.vit_lora is not None:
            same = set(embedded) == set(plan.vit_lora.tensors) and all(
                torch.equal(v, plan.vit_lora.tensors[k]) for k, v in embedded.items())
            report.ignored.append(f"{len(embedded)} ViT-LoRA tensors inside {Path(plan.llm_lora.source).name} "
                                  f"({'equal to' if same else 'DIFFERENT from'} Vit-lora/; Vit-lora/ is used, as by the "
                                  "official loader, docs/spec.md 6.2 / 8.15)")
        elif is_identity(Adapter({}, embedded, "")):
            report.ignored.append(f"{len(embedded)} ViT-LoRA tensors inside {Path(plan.llm_lora.source).name}: identity "
                                  "(every lora_B is 0, docs/spec.md 8.1) and no Vit-lora/ folder, so nothing to import")
        else:
            report.ignored.append(f"{len(embedded)} trained ViT-LoRA tensors inside {Path(plan.llm_lora.source).name}: "
                                  "unused by the official loader (docs/spec.md 6.2 step 4 / 8.15)")
            report.warn(f"{plan.llm_lora.source} carries trained ViT-LoRA tensors (some lora_B is not 0) but there is no "
                        f"{vit_dir}: they are ignored, as the official loader ignores them (the tower does not exist "
                        "yet when it loads the adapter, docs/spec.md 6.2 / 8.15); the vision tower runs without ViT-LoRA. To "
                        "use them, put the release's Vit-lora folder (it holds their lora_alpha) beside the adapter")
    if plan.vit_lora is not None:
        report.vit_lora_identity = is_identity(plan.vit_lora)


def _plan_projector(plan: Plan, model_dir: Path, base_is_model: bool) -> None:
    """non_lora_trainables.bin > mm_projector.bin > the model folder's own model.mm_projector.* (docs/spec.md 6.1 / 6.2)."""
    for name in ("non_lora_trainables.bin", "mm_projector.bin"):
        path = model_dir / name
        if path.is_file() and plan.projector is None:  # the first one found wins
            parts = _split("official_non_lora", _read_tensors(path), str(path))
            plan.llm_overrides.update(parts.get("llm", {}))
            if parts.get("projector"):
                plan.projector, plan.projector_source = parts["projector"], str(path)
    if plan.projector is None and not base_is_model:
        raise CheckpointError(f"missing file {model_dir / 'non_lora_trainables.bin'}: a LoRA release keeps its projector "
                              "there (docs/spec.md 6.1); the base's own projector is not SQ-LLaVA's")
    if plan.projector is None:
        plan.projector_source = f"model.mm_projector.* in {model_dir}"
        plan.projector_from_pretrained = True
    else:
        plan.config = check_projector(plan.config, plan.projector, plan.projector_source)
        plan.ignore_reasons["projector"] = (f"the base's own projector, replaced by {Path(plan.projector_source).name} "
                                            "(docs/spec.md 6.2 step 2 / 8.5)")


def plan_official(kind: str, model_dir: Path, base: Path | None, vision_tower: Path | None) -> Plan:
    """Resolve an official SQ-LLaVA / LLaVA-1.5 release (LoRA or full) into a Plan (docs/spec.md 6.1-6.3)."""
    cfg = read_json(model_dir / "config.json")
    if not any(key in cfg for key in OFFICIAL_KEYS):
        raise CheckpointError(f"{model_dir / 'config.json'} has none of {', '.join(OFFICIAL_KEYS)}: not an official "
                              "SQ-LLaVA / LLaVA-1.5 folder (llava-hf folders: --from llava-hf)")
    lora_release = (model_dir / "adapter_config.json").is_file()
    if base is None and lora_release:
        ref = read_json(model_dir / "adapter_config.json").get("base_model_name_or_path")
        base = _local_ref(model_dir, ref)
        if base is None:
            raise CheckpointError(f"{model_dir} is a LoRA release; pass its base LLM with --base DIR (the official "
                                  f"--model-base; adapter_config.json names {ref!r}, not found locally)")
    elif base is None:
        if not _has_weights(model_dir):
            what = ("a projector-only (stage-1) folder: mm_projector.bin" if (model_dir / "mm_projector.bin").is_file()
                    else "no LLM weights")
            raise CheckpointError(f"{model_dir} holds {what}; pass the LLM it was trained on with --base DIR (the "
                                  "official --model-base, e.g. vicuna-7b-v1.5)")
        base = model_dir
    if vision_tower is None:
        ref = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
        vision_tower = _local_ref(model_dir, ref)
        if vision_tower is None:
            raise CheckpointError(f"pass the CLIP tower folder with --vision-tower DIR (config.json names {ref!r}, "
                                  "not found locally)")
    pre = vision_tower / "preprocessor_config.json"
    report = Report(kind)
    warnings: list[str] = []
    config = official_model_config(cfg, read_json(vision_tower / "config.json"), read_json(pre) if pre.is_file() else None,
                                   kind, model_dir / "config.json", warnings)
    for text in warnings:
        report.warn(text)
    base_is_model = Path(base).resolve() == model_dir.resolve()
    if not base_is_model:
        _check_base_config(config, base)
    plan = Plan(kind, config, [(find_weights(base), "official_llm"), (find_weights(vision_tower), "clip")],
                {"llm": Path(base), "vision": Path(vision_tower)}, None, "", report=report,
                added_tokens=added_tokens(cfg, model_dir / "config.json"))
    _plan_projector(plan, model_dir, base_is_model)
    _plan_adapters(plan, model_dir, _shapes(plan.config, ("llm", "vision")))
    plan.tokenizer_dir = _tokenizer_dir(base, model_dir)
    return plan


def plan_llava_hf(model_dir: Path) -> Plan:
    """Resolve a transformers LlavaForConditionalGeneration folder: LLM, tower and projector share its weight files."""
    cfg = read_json(model_dir / "config.json")
    pre = model_dir / "preprocessor_config.json"
    config = llava_hf_model_config(cfg, read_json(pre) if pre.is_file() else None, model_dir / "config.json")
    return Plan("llava-hf", config, [(find_weights(model_dir), "llava_hf")], {"llm": model_dir, "vision": model_dir},
                None, f"multi_modal_projector.* in {model_dir}", tokenizer_dir=_tokenizer_dir(model_dir),
                report=Report("llava-hf"))


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _link_problem(plan: Plan, part: str) -> str | None:
    """Why the base folder of `part` cannot be referenced as is (None: it can)."""
    folder = plan.folders[part]
    if any(layout == "llava_hf" for _, layout in plan.streams):
        return "the LLM, tower and projector share one set of llava-hf weight files"
    model_type = read_json(folder / "config.json").get("model_type")
    want = "llama" if part == "llm" else "clip_vision_model"
    if model_type != want:
        return f"{folder / 'config.json'} says model_type {model_type!r}, not {want!r}"
    if part == "llm" and (plan.llm_overrides or plan.projector is None):
        return "some of its tensors are replaced or taken out (non_lora_trainables.bin / the projector)"
    if part == "llm" and plan.added_rows:
        return f"its embeddings gain {plan.added_rows} row(s) for {', '.join(plan.added_tokens)} (mm_use_im_patch_token)"
    return None


def _stream(plan: Plan, sinks: dict[str, Callable], flushes: list[Callable], progress: bool) -> Counter:
    """Route every tensor of every stream to its part's sink, one input shard at a time; -> ignored counts."""
    from tqdm import tqdm

    ignored: Counter = Counter()
    for files, layout in plan.streams:
        last = None
        bar = tqdm(total=len(files), desc=f"reading {files[0].parent.name}", unit="shard", disable=not progress)
        for number, key, handle in iter_tensors(files):
            if number != last:  # a new input shard: write out what the previous one gave
                for flush in flushes:
                    flush()
                bar.update(0 if last is None else 1)
                last = number
            mapped = to_ours(layout, key)
            if mapped is None:
                raise CheckpointError(f"{handle.path}: unknown tensor {key}; not a {layout} weights file")
            part, ours, rule = mapped
            if part not in sinks:
                reason = plan.ignore_reasons.get(part, rule.source)
                ignored[(rule.theirs, str(handle.path.parent), reason)] += 1
                continue
            sinks[part](ours, handle.get(key), str(handle.path))
        bar.update(1)
        bar.close()
    for flush in flushes:
        flush()
    return ignored


def _llm_sink(writer, plan: Plan) -> Callable:
    vocab = plan.config.llm.vocab_size
    stored = vocab - plan.added_rows  # rows in the files; the official loader resizes them to len(tokenizer)

    def add(key: str, tensor, source: str) -> None:
        tensor = plan.llm_overrides.get(key, tensor)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            if tensor.shape[0] != stored:
                raise CheckpointError(f"vocab size mismatch: {source} {key} has {tensor.shape[0]} rows but the config "
                                      f"says vocab_size={stored}; the weights and the config come from different models")
            if plan.added_rows:
                tensor = _append_mean_rows(tensor, plan.added_rows)
        writer.add(key, tensor, source)

    return add


def _append_mean_rows(tensor, count: int):
    """Rows for added tokens: the mean of the existing rows (transformers' resize_token_embeddings since 4.46; the
    official loader, on transformers 4.31, draws them at random, docs/spec.md 6.2)."""
    import torch

    mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
    return torch.cat([tensor, mean.expand(count, -1)])


def _write_bases(plan: Plan, tmp: Path, dtype, base_weights: str, max_shard_bytes: int, progress: bool) -> dict:
    from sqllava_edge.model import hf_clip_config, hf_llama_config

    shapes, refs, writers = _shapes(plan.config), {}, {}
    for part, what in (("llm", "LLM"), ("vision", "vision tower")):
        problem = _link_problem(plan, part)
        if base_weights == "link" and problem:
            raise CheckpointError(f"cannot reference the base {part} in place: {problem}; use --base-weights copy")
        link = base_weights == "link" or (base_weights == "auto" and problem is None)
        refs[part] = str(plan.folders[part].resolve()) if link else part
        writers[part] = ShardWriter(None if link else tmp / part, shapes[part], dtype, what, max_shard_bytes)
    collected: dict = {}
    sinks: dict[str, Callable] = {"llm": _llm_sink(writers["llm"], plan), "vision": writers["vision"].add}
    if plan.projector is None:
        sinks["projector"] = lambda key, tensor, source: collected.__setitem__(key, tensor)
    ignored = _stream(plan, sinks, [w.flush for w in writers.values()], progress)
    for part, hf in (("llm", hf_llama_config(plan.config.llm)), ("vision", hf_clip_config(plan.config.vision))):
        count = writers[part].finish()
        if refs[part] == part:
            hf.save_pretrained(tmp / part)
        dtypes = "/".join(sorted(writers[part].source_dtypes))
        where = f"written to {part}/" if refs[part] == part else "referenced in place"
        plan.report.loaded.append(f"{part}: {count} tensors ({dtypes}) from {plan.folders[part]}, {where}")
    for (pattern, folder, reason), count in sorted(ignored.items()):
        plan.report.ignored.append(f"{count} tensor(s) {pattern} in {folder}: {reason}")
    if plan.projector is None:
        plan.projector = collected
        plan.config = check_projector(plan.config, collected, plan.projector_source)
    return refs


def _write_adapter(adapter: Adapter, folder: Path, dtype) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(**adapter.fields, inference_mode=True).save_pretrained(str(folder))
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in adapter.tensors.items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def _load_tokenizer(plan: Plan):
    """The tokenizer to write (None: the default one at load time), with the tokens the official loader adds; grows
    plan.config's vocabulary to the tokenizer's length when those tokens need new embedding rows (docs/spec.md 6.2)."""
    from sqllava_edge.tokenizer import default_tokenizer, load_tokenizer

    if plan.tokenizer_dir is None and not plan.added_tokens:
        plan.report.notes.append("no tokenizer files found; the default Llama-2 tokenizer (32000) will be used")
        return None
    if plan.tokenizer_dir is None:
        tok, where = copy.deepcopy(default_tokenizer()), "the default Llama-2 tokenizer (no tokenizer files found)"
    else:
        try:
            tok, where = load_tokenizer(plan.tokenizer_dir), str(plan.tokenizer_dir)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read the tokenizer in {plan.tokenizer_dir}: {exc}") from None
    missing = [t for t in plan.added_tokens if t not in tok.hf.get_vocab()]
    if missing:
        tok.hf.add_tokens(missing, special_tokens=True)
    plan.report.loaded.append(f"tokenizer ({tok.vocab_size} tokens) from {where}"
                              + (f", plus {', '.join(missing)} (mm_use_im_patch_token)" if missing else ""))
    vocab = plan.config.llm.vocab_size
    beyond = {token: i for token, i in tok.hf.get_vocab().items() if i >= vocab}
    if set(beyond) - set(plan.added_tokens):
        raise CheckpointError(f"vocab size mismatch: the tokenizer in {where} has {tok.vocab_size} tokens but the LLM "
                              f"has {vocab} embedding rows")
    if beyond:
        plan.added_rows = tok.vocab_size - vocab
        plan.config = plan.config.replace(llm=dataclasses.replace(plan.config.llm, vocab_size=tok.vocab_size))
        plan.report.notes.append(
            "mm_use_im_patch_token is on (config.json; the official default when the key is missing): "
            f"{', '.join(f'{t} = id {i}' for t, i in sorted(beyond.items(), key=lambda x: x[1]))}; embed_tokens and "
            f"lm_head grow to {tok.vocab_size} rows as the official loader's resize_token_embeddings does. The new rows "
            "are the mean of the others (the official loader draws them at random); no prompt contains the token")
    return tok


def _dtypes(tensors: dict, written) -> str:
    """"bfloat16" (kept as stored) or "bfloat16 -> float16" (cast by --dtype)."""
    stored = "/".join(sorted({str(v.dtype).replace("torch.", "") for v in tensors.values()}))
    target = str(written).replace("torch.", "") if written is not None else None
    return stored if target in (None, stored) else f"{stored} -> {target}"


def _apply_sim_beta(plan: Plan) -> dict[str, Any] | None:
    """A merged SQ-LLaVA folder's sim_beta, as plan.sim_beta chooses; -> the provenance record (None: not such a folder).

    The official code loads a full folder with transformers 4.31's from_pretrained, which renames every checkpoint key
    containing "beta" to "bias" (modeling_utils.py, _fix_key): model.mm_projector.sim_beta becomes an unexpected
    ...sim_bias and the model keeps its own sim_beta, created as 0.0 (cluster.py). (Strictly: the builder passes
    low_cpu_mem_usage=True, under which 4.31 re-creates a missing parameter with torch.empty and LLaMA's _init_weights
    leaves it alone, so the official value is 0.0 when that allocation is zeroed; "official" writes 0.0.) LoRA
    releases and stage-1 folders are unaffected: their projector file is read with a plain load_state_dict.
    """
    import torch

    if not plan.projector_from_pretrained or "sim_beta" not in plan.projector:
        return None
    saved = plan.projector["sim_beta"]
    file_value = float(saved.float().flatten()[0])
    used = file_value if plan.sim_beta == "file" else OFFICIAL_SIM_BETA
    if plan.sim_beta == "official":
        plan.projector["sim_beta"] = torch.full_like(saved, OFFICIAL_SIM_BETA)
    other = "official" if plan.sim_beta == "file" else "file"
    text = (f"sim_beta: the file holds {file_value} (model.mm_projector.sim_beta); the official code computes with "
            f"{OFFICIAL_SIM_BETA}, because transformers 4.31's from_pretrained renames keys containing 'beta' to 'bias' "
            f"and so never loads it. Written: {used} (--sim-beta {plan.sim_beta}; --sim-beta {other} writes "
            f"{OFFICIAL_SIM_BETA if other == 'official' else file_value})")
    if file_value == OFFICIAL_SIM_BETA:
        plan.report.notes.append(text + "; both give the same outputs")
    else:
        plan.report.warn(text + "; answers differ between the two")
    return {"choice": plan.sim_beta, "file": file_value, "official": OFFICIAL_SIM_BETA, "used": used}


def write_plan(plan: Plan, out: Path, *, dtype: str = "keep", base_weights: str = "copy",
               max_shard_bytes: int = 2 << 30, progress: bool = True) -> Report:
    """Write `plan` as our checkpoint folder `out` (docs/DESIGN.md), atomically."""
    from safetensors.torch import save_file

    from sqllava_edge.fileutil import atomic_dir

    if dtype != "keep" and dtype not in DTYPES:
        raise ValueError(f"dtype must be keep or one of {', '.join(DTYPES)}, got {dtype!r}")
    torch_dtype = None if dtype == "keep" else DTYPES[dtype]
    tokenizer = _load_tokenizer(plan)
    report = plan.report
    report.out = str(out)
    with atomic_dir(out) as tmp:
        refs = _write_bases(plan, tmp, torch_dtype, base_weights, max_shard_bytes, progress)
        sim_beta = _apply_sim_beta(plan)
        projector = {k: (v.to(torch_dtype) if torch_dtype else v).contiguous() for k, v in plan.projector.items()}
        save_file(projector, str(tmp / "projector.safetensors"), metadata={"format": "pt"})
        report.loaded.append(f"projector ({plan.config.projector.type}): {len(projector)} tensors "
                             f"({_dtypes(plan.projector, torch_dtype)}) from {plan.projector_source}")
        if plan.llm_overrides:
            report.loaded.append(f"LLM tensors replaced from {plan.projector_source}: {sorted(plan.llm_overrides)}")
        lora = {"llm": None, "vision": None}
        for part, adapter, name in (("llm", plan.llm_lora, "llm_lora"), ("vision", plan.vit_lora, "vit_lora")):
            if adapter is not None and adapter.tensors:
                _write_adapter(adapter, tmp / name, torch_dtype)
                lora[part] = name
                report.loaded.append(f"{'LLM' if part == 'llm' else 'ViT'}-LoRA: {len(adapter.tensors)} tensors "
                                     f"({_dtypes(adapter.tensors, torch_dtype)}), r={adapter.fields['r']}, "
                                     f"alpha={adapter.fields['lora_alpha']}, from {adapter.source}")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        provenance = {"converted_from": plan.kind, "report": report.to_dict()}
        if sim_beta is not None:
            provenance["sim_beta"] = sim_beta
        meta = {"format": FORMAT, "version": VERSION, "config": plan.config.to_dict(), "base": refs, "lora": lora,
                "provenance": provenance}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return report


def convert(kind: str, model_dir, out, *, base=None, vision_tower=None, dtype: str = "keep",
            base_weights: str = "copy", max_shard_bytes: int = 2 << 30, progress: bool = True,
            sim_beta: str = "file") -> Report:
    """Import a released folder of `kind` (sqllava | llava | llava-hf) into our checkpoint `out`; -> the Report.

    sim_beta: for a full (merged) SQ-LLaVA folder, "file" keeps the saved model.mm_projector.sim_beta, "official"
    writes 0.0, the value the official code computes with (it never loads the saved one, see _apply_sim_beta).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)}")
    if sim_beta not in SIM_BETA_CHOICES:
        raise ValueError(f"sim_beta must be one of {', '.join(SIM_BETA_CHOICES)}, got {sim_beta!r}")
    model_dir = Path(model_dir)
    found = detect_layout(model_dir)
    family = {"sqllava": "official", "llava": "official", "llava-hf": "llava-hf"}
    if found == "sqllava-edge" or family[found] != family[kind]:
        raise CheckpointError(f"{model_dir} holds a {found} layout (from its config keys), not {kind}; use --from {found}")
    if kind == "llava-hf":
        plan = plan_llava_hf(model_dir)
    else:
        plan = plan_official(kind, model_dir, Path(base) if base else None, Path(vision_tower) if vision_tower else None)
    if sim_beta == "official" and not (plan.projector_from_pretrained and plan.config.projector.type == "cluster"):
        where = (f"its projector comes from {Path(plan.projector_source).name}, which the official code reads with "
                 "load_state_dict and so keeps sim_beta" if not plan.projector_from_pretrained
                 else f"its projector is {plan.config.projector.type!r}, which has no sim_beta")
        raise CheckpointError(f"--sim-beta official applies to full (merged) SQ-LLaVA folders only; {model_dir}: {where}. "
                              "Leave --sim-beta at its default (file)")
    plan.sim_beta = sim_beta
    return write_plan(plan, Path(out), dtype=dtype, base_weights=base_weights, max_shard_bytes=max_shard_bytes,
                      progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# Any folder -> model


def detect_layout(folder) -> str:
    """"sqllava-edge" | "sqllava" | "llava" | "llava-hf", from the folder's metadata keys (never from its name)."""
    folder = Path(folder)
    if (folder / META_FILE).is_file():
        return "sqllava-edge"
    cfg = read_json(folder / "config.json")
    if any(key in cfg for key in OFFICIAL_KEYS):
        return "sqllava" if cfg.get("mm_projector_type") == "cluster" else "llava"
    if "text_config" in cfg and "vision_config" in cfg and cfg.get("model_type") == "llava":
        return "llava-hf"
    raise CheckpointError(f"cannot tell the layout of {folder}: config.json has none of {', '.join(OFFICIAL_KEYS)} "
                          "(official SQ-LLaVA / LLaVA-1.5) nor model_type llava with text_config + vision_config (llava-hf)")


def load_any(folder, **load_kwargs):
    """-> (SQLLaVA, Tokenizer) from our checkpoint or any folder `convert` understands (PyTorch backend).

    Foreign folders are converted into a temporary checkpoint first: plain LLaMA / CLIP bases are referenced, others
    (ShareGPT4V's share4v base, full LLaVA folders, llava-hf) are copied there, which needs their size in temporary
    disk space. The conversion report is logged. load_kwargs go to sqllava_edge.checkpoint.load_checkpoint.
    """
    from sqllava_edge.checkpoint import load_checkpoint

    kind = detect_layout(folder)
    if kind == "sqllava-edge":
        return load_checkpoint(folder, **load_kwargs)
    with tempfile.TemporaryDirectory(prefix="sqllava-import-") as tmp:
        report = convert(kind, folder, Path(tmp) / "checkpoint", base_weights="auto", progress=False)
        log.info("%s", report.text())
        return load_checkpoint(Path(tmp) / "checkpoint", **load_kwargs)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(prog="python -m sqllava_edge.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="kind", required=True, choices=KINDS,
                        help="sqllava: SQ-LLaVA release (LoRA + non_lora_trainables.bin + Vit-lora/); llava: liuhaotian "
                             "LLaVA-1.5 folder (full or LoRA); llava-hf: transformers' LlavaForConditionalGeneration folder")
    parser.add_argument("--adapter", "--model", dest="model", required=True, type=Path,
                        help="the released folder: config.json with mm_* keys (+ adapter files), or the llava-hf folder")
    parser.add_argument("--base", type=Path, help="base LLM folder (the official --model-base, e.g. ShareGPT4V-7B_..."
                        "_vicuna-7b-v1.5); default: adapter_config.json's base if local, or --adapter itself (full models)")
    parser.add_argument("--vision-tower", type=Path, help="CLIP tower folder; default: config.json's mm_vision_tower if local")
    parser.add_argument("--out", required=True, type=Path, help="our checkpoint folder to write (replaced atomically)")
    parser.add_argument("--dtype", default="keep", choices=["keep", "float32", "float16", "bfloat16"],
                        help="dtype of the written weights (default: as stored in the sources)")
    parser.add_argument("--base-weights", default="copy", choices=["copy", "link", "auto"],
                        help="copy the base LLM / tower into the checkpoint, or reference plain LLaMA / CLIP folders in "
                             "place (link; auto = link when possible)")
    parser.add_argument("--shard-size-gb", type=float, default=2.0, help="largest output shard, in GiB")
    parser.add_argument("--sim-beta", default="file", choices=SIM_BETA_CHOICES,
                        help="full (merged) SQ-LLaVA folders only: file = the saved model.mm_projector.sim_beta (the "
                             "trained value); official = 0.0, what the official code computes with (transformers "
                             "4.31 never loads the saved value), to reproduce its outputs")
    args = parser.parse_args(argv)
    try:
        report = convert(args.kind, args.model, args.out, base=args.base, vision_tower=args.vision_tower,
                         dtype=args.dtype, base_weights=args.base_weights,
                         max_shard_bytes=int(args.shard_size_gb * (1 << 30)), sim_beta=args.sim_beta)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(report.text())
    return report


if __name__ == "__main__":
    main()
