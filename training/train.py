"""Two-stage SQ-LLaVA training (docs/spec.md 2, 3, 4): knobs in a dataclass, then setup sections, then one visible loop.

    python -m training --stage 1 --data DATA/stage1.json --out runs/s1                 # projector, `plain` captions
    python -m training --stage 2 --data DATA/stage2.json --init runs/s1 --out runs/s2  # LoRAs + projector, `v1_sq`
    torchrun --nproc_per_node 8 -m training --stage 2 ...                             # DDP (gloo on CPU, nccl on GPU)

OUT holds `checkpoint/` (the sqllava-edge checkpoint, rewritten atomically every --save-every steps and at the end,
with the training state that --resume continues from), `metrics.jsonl` (one record per step), `loss_curve.png`
and `train_config.json`.

The loss of one optimizer step is the token-level mean cross-entropy over the whole global batch (all micro-batches
of all processes). With one micro-batch on one process this is the reference's per-micro-batch mean (docs/spec.md 1.6, 8.9);
with several it keeps the gradient independent of how the batch is split, so N processes reproduce one process.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sqllava_edge.checkpoint import resolve_checkpoint
from training.recipes import resolve_recipe


@dataclass
class TrainConfig:
    stage: int
    data: str
    out: str
    image_folder: str | None = None
    preset: str = "tiny"
    llm_base: str | None = None
    vision_base: str | None = None
    base_seed: int = 0
    init: str | None = None
    resume: bool = False
    recipe: str = "auto"
    # Filled from the recipe when None (docs/spec.md 4.2 for "released"):
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lr: float | None = None
    projector_lr: float | None = None
    vit_lr: float | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_dropout: float | None = None
    vit_lora_r: int | None = None
    vit_lora_alpha: int | None = None
    vit_lora_dropout: float | None = None
    sq_r: float | None = None
    template: str | None = None
    image_mode: str | None = None
    max_length: int | None = None
    freeze_vit_lora: bool = False
    seed: int = 42
    save_every: int = 0
    stop_after: int | None = None
    num_workers: int | None = None
    threads: int | None = None
    device: str = "auto"
    bf16: bool | None = None
    grad_checkpointing: bool | None = None
    fsdp: bool = False
    skip_zero_rows: bool = True
    fused_adamw: bool | None = None
    progress: bool = True


HELP: dict[str, str] = {
    "stage": "1 = projector pre-training on captions; 2 = self-questioning instruction tuning with LoRA",
    "data": "LLaVA JSON list of {'image', 'conversations'} (docs/spec.md 4.5)",
    "out": "run folder: checkpoint/, metrics.jsonl, loss_curve.png",
    "image_folder": "folder the JSON's image paths are relative to (default: <json folder>/images)",
    "preset": "stage 1: model preset to build (see sqllava_edge.config.PRESETS)",
    "llm_base": "stage 1: local transformers Llama folder with the base LLM (default: random weights from the preset)",
    "vision_base": "stage 1: local transformers CLIP vision folder (default: random weights from the preset)",
    "base_seed": "seed of the random base weights when no --llm-base/--vision-base is given",
    "init": "stage 2: the stage-1 run folder or checkpoint to start from",
    "resume": "continue OUT/checkpoint exactly (optimizer, scheduler, RNG, step, data position)",
    "recipe": "hyperparameter set: 'released' (docs/spec.md 4.2), 'tiny-demo' (the CPU demo), or 'auto' (tiny-demo for the "
              "tiny preset, else released); explicit flags override it",
    "epochs": "passes over the data (fractions allowed)",
    "max_steps": "optimizer steps in total (overrides --epochs)",
    "batch_size": "samples per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak LR: the projector in stage 1, LLM-LoRA in stage 2",
    "projector_lr": "stage 2: projector LR (mm_projector_lr)",
    "vit_lr": "stage 2: ViT-LoRA LR (vision_tower_lr)",
    "warmup_ratio": "share of the steps with linear warm-up before the cosine decay",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "clip the global gradient norm to this (0 = no clipping)",
    "lora_r": "LLM-LoRA rank", "lora_alpha": "LLM-LoRA alpha", "lora_dropout": "LLM-LoRA dropout",
    "vit_lora_r": "ViT-LoRA rank", "vit_lora_alpha": "ViT-LoRA alpha", "vit_lora_dropout": "ViT-LoRA dropout",
    "sq_r": "probability that a later human turn becomes a self-questioning VUSER turn, re-drawn on every read",
    "template": "conversation template ('plain' for stage 1, 'v1_sq' for stage 2)",
    "image_mode": "image preprocessing: crop (stage 1), pad (stage 2) or resize",
    "max_length": "truncate text token ids to this many (the image adds its tokens after)",
    "freeze_vit_lora": "keep ViT-LoRA at identity, as in the released checkpoints (docs/spec.md 8.1); default: train it, as "
                       "the paper describes",
    "seed": "seed of data order, self-questioning draws, LoRA init and dropout",
    "save_every": "write the checkpoint every N optimizer steps (0 = only at the end)",
    "stop_after": "stop after N optimizer steps of this invocation, with a checkpoint (continue with --resume)",
    "num_workers": "data loader worker processes (default: 0 on CPU, 4 on CUDA)",
    "threads": "torch CPU threads (default: torch's choice)",
    "device": "auto | cpu | cuda",
    "bf16": "bf16 autocast with the frozen base stored in bf16, on CUDA or CPU; trained weights stay fp32 "
            "(default: on for CUDA)",
    "grad_checkpointing": "activation checkpointing in the LLM and ViT (default: on for CUDA)",
    "fsdp": "shard with FSDP instead of DDP (for models that do not fit one GPU)",
    "skip_zero_rows": "compute the loss through the frozen LM head's non-zero rows only, the all-zero rows as one "
                      "term (exact; pays when a head has many, as the tiny stand-in LLM's; no effect otherwise)",
    "fused_adamw": "PyTorch's fused AdamW kernel (same update, one pass; default: on where this torch has it)",
    "progress": "show the tqdm progress bar",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind.startswith("bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
        else:
            caster = float if "float" in kind else int if "int" in kind else str
            required = f.default is dataclasses.MISSING
            parser.add_argument(flag, type=caster, required=required, default=None if required else f.default,
                                help=HELP[f.name], **({"choices": [1, 2]} if f.name == "stage" else {}))
    parser.set_defaults(**{"recipe": "auto"})
    args = parser.parse_args(argv)
    return TrainConfig(**vars(args))


# ----------------------------------------------------------------------------------------------------------------
# Setup sections


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # docs/spec.md 4.2: tf32
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local, device)


def build_model(cfg: TrainConfig, dist: Dist):
    """-> (model, tokenizer, base_refs, resume_state or None)."""
    from sqllava_edge.checkpoint import load_checkpoint, read_meta
    from sqllava_edge.config import get_preset
    from sqllava_edge.tokenizer import default_tokenizer
    from training import modeling
    from training.state import read_training_state

    base_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if cfg.resume:
        ckpt = Path(cfg.out) / "checkpoint"
        state = read_training_state(ckpt, dist.rank)
        model, tok = load_checkpoint(ckpt, trainable_lora=True, dtype=base_dtype)
        _restore_projector(model, ckpt)
        return model, tok, _external_bases(read_meta(ckpt)), state
    if cfg.stage == 1:
        if cfg.init:
            raise ValueError("stage 1 builds its model from --preset (and --llm-base/--vision-base); --init is for stage 2")
        model, refs = modeling.load_base_parts(get_preset(cfg.preset), cfg.llm_base, cfg.vision_base, cfg.base_seed,
                                               base_dtype)
        return model, default_tokenizer(), refs, None
    if not cfg.init:
        raise ValueError("stage 2 starts from a stage-1 checkpoint: pass --init RUN_OR_CHECKPOINT")
    ckpt = resolve_checkpoint(cfg.init)
    model, tok = load_checkpoint(ckpt, dtype=base_dtype)
    _restore_projector(model, ckpt)
    torch.manual_seed(cfg.seed)  # LoRA A init: identical on every rank
    modeling.attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, vit_r=cfg.vit_lora_r,
                         vit_alpha=cfg.vit_lora_alpha, vit_dropout=cfg.vit_lora_dropout)
    return model, tok, _external_bases(read_meta(ckpt)), None


def _restore_projector(model, ckpt: Path) -> None:
    """load_checkpoint casts the projector to the base dtype (bf16 under --bf16), but it trains in fp32: put back the
    saved weights as saved, or a resumed run would continue from rounded ones. (PEFT keeps the LoRA weights fp32.)"""
    from safetensors.torch import load_file

    model.projector.load_state_dict(load_file(ckpt / "projector.safetensors"), assign=True)


def _external_bases(meta: dict[str, Any]) -> dict[str, str]:
    """Bases the checkpoint references by absolute path stay referenced; bases stored inside are copied."""
    return {part: ref for part, ref in meta["base"].items() if Path(ref).is_absolute()}


def build_optimizer(cfg: TrainConfig, groups: dict[str, list], total_steps: int, device=None):
    from training.speed import adamw_kwargs

    lrs = {"projector": cfg.lr if cfg.stage == 1 else cfg.projector_lr, "llm_lora": cfg.lr, "vit_lora": cfg.vit_lr}
    param_groups = [{"name": name, "params": [p for _, p in params], "lr": lrs[name]} for name, params in groups.items()]
    optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay,
                                  **adamw_kwargs(cfg.fused_adamw, device, fsdp=cfg.fsdp))
    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # docs/spec.md 4.2: linear warm-up, then cosine to 0 (HF get_cosine_schedule_with_warmup)
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def wrap_parallel(cfg: TrainConfig, dist: Dist, loss_module):
    if dist.world == 1 and not cfg.fsdp:
        return loss_module
    if cfg.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import CustomPolicy

        from training.modeling import fsdp_units

        units = fsdp_units(loss_module.model)  # one dtype per unit: bf16 frozen layers, fp32 LoRA and projector
        # The module is in host memory (setup does not move it): device_id makes FSDP move each unit to the device
        # when it wraps it (innermost first), then shard it. CPU works with gloo when named.
        return FSDP(loss_module, auto_wrap_policy=CustomPolicy(lambda module: module in units), use_orig_params=True,
                    device_id=dist.device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DDP(loss_module, device_ids=ids, find_unused_parameters=True)  # projector ln_1 never gets a grad (docs/spec.md 1.4.1)


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """Everything the loop works with, built by `setup`."""

    cfg: TrainConfig
    dist: Dist
    out: Path
    model: Any
    tokenizer: Any
    base_refs: dict[str, str]
    groups: dict[str, list]
    engine: Any
    sampler: Any
    loader: Any
    optimizer: Any
    scheduler: Any
    total_steps: int
    start_step: int
    resumed: bool


def setup(cfg: TrainConfig) -> Run:
    from training import modeling
    from training.data import ConversationDataset, StepSampler, make_loader
    from training.state import set_rng_state

    cfg = resolve_recipe(cfg)
    dist = setup_distributed(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if not cfg.resume and (out / "checkpoint").exists():
        raise FileExistsError(f"{out}/checkpoint exists; pass --resume to continue it or choose a new --out")
    torch.manual_seed(cfg.seed)

    # --- model, trainable parameters, loss
    model, tokenizer, base_refs, resumed = build_model(cfg, dist)
    model.projector.float()  # trained in fp32 even when the frozen base is bf16 (autocast does the matmuls)
    if not cfg.fsdp:
        model.to(dist.device)
    # Under FSDP the model stays in host memory: FSDP's device_id moves each unit to the device as it wraps it and
    # shards it at once, so a GPU holds its shards plus one unit, never the whole model (13B in bf16 is ~26 GB).
    modeling.set_trainable(model, cfg.stage, cfg.freeze_vit_lora)
    if cfg.grad_checkpointing:
        for part in (modeling.base_module(model.llm), modeling.base_module(model.vision.clip)):
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_module = modeling.LossModule(model, share_prefix=not cfg.grad_checkpointing, lockstep=cfg.fsdp,
                                      skip_zero_rows=cfg.skip_zero_rows)
    engine = wrap_parallel(cfg, dist, loss_module)
    if cfg.fsdp and loss_module.head is not None:
        loss_module.head.to(dist.device)  # built from the head while it was still in host memory
    groups = modeling.optimizer_groups(engine)

    # --- data, optimizer, and the saved state when resuming
    folder = cfg.image_folder or str(Path(cfg.data).parent / "images")
    dataset = ConversationDataset(cfg.data, folder, tokenizer, model.config.vision, template=cfg.template,
                                  image_mode=cfg.image_mode, sq_r=cfg.sq_r, max_length=cfg.max_length, seed=cfg.seed)
    sampler = StepSampler(len(dataset), cfg.batch_size, cfg.grad_accum, dist.rank, dist.world, cfg.seed)
    total_steps = cfg.max_steps or max(1, int(cfg.epochs * sampler.steps_per_epoch))
    optimizer, scheduler = build_optimizer(cfg, groups, total_steps, dist.device)
    start_step = 0
    if resumed is not None:
        _check_resume(cfg, resumed, dist)
        _load_optimizer_state(cfg, engine, optimizer, resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start_step = resumed["step"]
        sampler.set_position(**resumed["data_position"])
        if resumed["rng"] is not None:
            set_rng_state(resumed["rng"])
    else:
        torch.manual_seed(cfg.seed + dist.rank)  # dropout streams differ per rank
    loader = iter(make_loader(dataset, sampler, num_workers=cfg.num_workers, pin_memory=dist.device.type == "cuda"))
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        print(_summary(cfg, model, groups, len(dataset), sampler, total_steps), flush=True)
    return Run(cfg, dist, out, model, tokenizer, base_refs, groups, engine, sampler, loader, optimizer, scheduler,
               total_steps, start_step, resumed is not None)


def save(run: Run, step: int) -> Path:
    """The checkpoint with its training state, atomically (rank 0 writes; every rank contributes its RNG state)."""
    from training.state import rng_state

    cfg, dist = run.cfg, run.dist
    rngs = _gather_objects(rng_state(), dist)
    ckpt = run.out / "checkpoint"
    model, optimizer_state = run.model, run.optimizer.state_dict()
    if cfg.fsdp:  # collective: the full weights and optimizer state (keyed by parameter name), one unit at a time
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        from training.modeling import model_holding

        # cpu_offload: only rank 0 gets them, in CPU memory. On a CPU device FSDP's offload frees the very storage
        # it hands out (its `.to("cpu")` is no copy there): every rank gathers instead.
        full = StateDictOptions(full_state_dict=True, cpu_offload=dist.device.type != "cpu")
        weights, optimizer_state = get_state_dict(run.engine, run.optimizer, options=full)
        weights = {k.removeprefix("model."): v for k, v in weights.items()}  # LossModule.model's names
        model = model_holding(run.model, weights) if dist.main else None
    if dist.main:
        _write(run, model, ckpt, step, optimizer_state, rngs)
    if dist.world > 1:
        torch.distributed.barrier()
    return ckpt


def _write(run: Run, model, ckpt: Path, step: int, optimizer_state: dict, rngs: list) -> None:
    from sqllava_edge.checkpoint import save_checkpoint
    from training.state import write_training_state

    cfg = run.cfg
    position = run.sampler.position_after(step - run.start_step)

    def extra(tmp: Path) -> None:
        write_training_state(tmp, step=step, position=position, train_config=dataclasses.asdict(cfg),
                             optimizer_state=optimizer_state, scheduler_state=run.scheduler.state_dict(),
                             rng_states=rngs, world_size=run.dist.world)

    save_checkpoint(ckpt, model, run.tokenizer, base_refs=run.base_refs, extra=extra,
                    provenance={"trainer": "python -m training", "stage": cfg.stage, "step": step,
                                "recipe": cfg.recipe, "sq_r": cfg.sq_r, "freeze_vit_lora": cfg.freeze_vit_lora})


def forward_backward(run: Run, micro: list) -> tuple[float, int, int, Counter]:
    """All micro-batches of one optimizer step -> (global mean loss, global trained tokens, LLM positions, stats).

    Token-level mean over the global batch: every rank divides its summed CE by the global token count (divided by
    the world size, because DDP averages gradients over ranks)."""
    dist = run.dist
    counts = torch.tensor([float(sum(b.n_trainable for b in micro))], device=dist.device)
    if dist.world > 1:
        torch.distributed.all_reduce(counts)
    norm = max(counts.item(), 1.0) / dist.world
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=bool(run.cfg.bf16))
    loss_sum, positions, stats = torch.zeros((), device=dist.device), 0, Counter()
    extra_rows = run.model.config.num_image_tokens - 1  # each image placeholder becomes T rows
    for k, batch in enumerate(micro):
        images = 0 if batch.pixel_values is None else batch.pixel_values.shape[0]
        positions += sum(len(r) for r in batch.input_ids) + images * extra_rows
        stats.update(batch.stats)
        if not len(batch):  # every sample skipped (missing images, nothing left to train, ...)
            if dist.world == 1:
                continue
            batch = _stand_in(run)  # the other ranks wait for this one in DDP's / FSDP's collectives
        last = k == len(micro) - 1
        with run.engine.no_sync() if not last and dist.world > 1 else contextlib.nullcontext():
            with autocast:  # the forward and the loss only: PyTorch's AMP guidance leaves autocast before backward
                ce, _ = run.engine(batch.input_ids, batch.labels, batch.pixel_values)
            (ce / norm).backward()
        loss_sum += ce.detach()
    if dist.world > 1:
        torch.distributed.all_reduce(loss_sum)
    return loss_sum.item() / max(counts.item(), 1.0), int(counts.item()), positions * dist.world, stats


def _stand_in(run: Run):
    """A micro-batch for a rank whose samples were all skipped: one token, nothing to train. It runs the same layers
    (and so the same collectives) as a real one and adds exactly 0 to the loss and to every gradient."""
    from sqllava_edge.config import IGNORE_INDEX
    from training.data import Batch

    ids = torch.tensor([run.tokenizer.bos_id], device=run.dist.device)
    return Batch([ids], [torch.full_like(ids, IGNORE_INDEX)], None)


def train(cfg: TrainConfig) -> Path:
    """Run one stage (or continue it); returns the checkpoint folder."""
    from training.state import MetricsLog, plot_loss

    run = setup(cfg)
    cfg, dist = run.cfg, run.dist
    log = MetricsLog(run.out / "metrics.jsonl", run.start_step if run.resumed else None) if dist.main else None
    trainable = [p for params in run.groups.values() for _, p in params]
    totals: Counter = Counter()
    bar = _progress(cfg, dist, run.start_step, run.total_steps)
    step, t_start = run.start_step, time.time()
    stop_at = run.total_steps if cfg.stop_after is None else min(run.total_steps, run.start_step + cfg.stop_after)
    run.engine.train()
    while step < stop_at:
        t0 = time.time()
        micro = [next(run.loader).to(dist.device) for _ in range(cfg.grad_accum)]
        loss, tokens, positions, stats = forward_backward(run, micro)
        totals.update(stats)
        grad_norm = _clip(run.engine, trainable, cfg.max_grad_norm)
        lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}  # the LRs this step used
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        tok_s = positions / max(time.time() - t0, 1e-9)
        if dist.main:
            log.write({"step": step, "loss": loss, "lr": lrs, "grad_norm": grad_norm, "trained_tokens": tokens,
                       "tok_per_s": tok_s, "elapsed": time.time() - t_start, "cpu_s": time.process_time(),
                       **_stats(totals)})
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{next(iter(lrs.values())):.2e}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < stop_at:
            save(run, step)
    ckpt = save(run, step)
    bar.close()
    totals = sum(_gather_objects(totals, dist), Counter())  # data counts of every rank
    if dist.main:
        plot_loss(log.records(), run.out / "loss_curve.png", f"stage {cfg.stage} ({run.model.config.name}, "
                                                             f"recipe {cfg.recipe})")
        print(json.dumps({"stage": cfg.stage, "steps": step, "wall_s": round(time.time() - t_start, 1),
                          **_stats(totals)}), flush=True)
        if totals["truncated"] or any(k.startswith("skipped_") for k in totals):
            print(f"data report: {totals['truncated']} truncated samples; skipped: "
                  f"{ {k[8:]: v for k, v in totals.items() if k.startswith('skipped_')} }", flush=True)
    return ckpt


def _clip(engine, params, max_norm: float) -> float:
    if not max_norm:
        norms = [p.grad.norm() for p in params if p.grad is not None]  # none when every sample was skipped
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
    if hasattr(engine, "clip_grad_norm_"):  # FSDP: the norm over all shards
        return float(engine.clip_grad_norm_(max_norm))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _stats(totals: Counter) -> dict[str, int]:
    keys = ("samples", "truncated", "sq_turns", "sq_eligible")
    return {**{k: int(totals[k]) for k in keys}, **{k: int(v) for k, v in totals.items() if k.startswith("skipped_")}}


def _gather_objects(obj, dist: Dist) -> list:
    if dist.world == 1:
        return [obj]
    gathered = [None] * dist.world
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _load_optimizer_state(cfg: TrainConfig, engine, optimizer, state: dict) -> None:
    if not cfg.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # The name-keyed full state (every rank read it) -> this rank's shard.
    set_optimizer_state_dict(engine, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _check_resume(cfg: TrainConfig, state: dict, dist: Dist) -> None:
    saved = state["train_config"]
    if saved["stage"] != cfg.stage:
        raise ValueError(f"the checkpoint is from stage {saved['stage']}, not --stage {cfg.stage}")
    if state["world_size"] * saved["batch_size"] * saved["grad_accum"] != dist.world * cfg.batch_size * cfg.grad_accum:
        raise ValueError("resume needs the same global batch (processes x --batch-size x --grad-accum) as the saved run")


def _progress(cfg: TrainConfig, dist: Dist, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"stage {cfg.stage}", unit="step", dynamic_ncols=True,
                disable=not (cfg.progress and dist.main))


def _summary(cfg, model, groups, n_samples, sampler, total_steps) -> str:
    counts = {name: sum(p.numel() for _, p in params) for name, params in groups.items()}
    return (f"stage {cfg.stage} | model {model.config.name} | recipe {cfg.recipe} | {n_samples} samples | global batch "
            f"{sampler.global_batch} | {total_steps} steps | trainable {counts} | lr {cfg.lr} | template "
            f"{cfg.template} | sq_r {cfg.sq_r} | image {cfg.image_mode}")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        train(cfg)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
