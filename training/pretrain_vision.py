"""Stage 0 (vision) for presets without a pretrained CLIP offline: teach the preset's ViT to see the synthetic scenes.

    python -m training.pretrain_vision --data DATA/stage2.json --preset tiny --out RUN [--eval-data DATA/eval.json]

SQ-LLaVA's vision tower is CLIP ViT-L/14-336 (docs/spec.md 1.2): features in which colour, shape and layout are already
separated. A random ViT of the tiny preset keeps most of that information but tangled (a ridge probe reads colour
presence at 92%, shape at 82%: training/RESULTS.md). This step makes a stand-in for CLIP at the preset's shape,
trained on the synthetic training images with their annotations: at the selected feature layer (docs/spec.md 1.2, the only
layers SQ-LLaVA runs), every patch learns to tell the colour, the shape and the size of the object covering it, or
that it is background. Only the training split is used; the held-out split's colour/shape pairs are never seen.

Trained on colour images only, the ViT ties shape to colour: it labels 80% of the held-out patches with the right
shape, and an orange square (a pair training never shows) comes out a circle. --gray-share 0.5 (the demo's) shows
half the training images in grey, with the objects' colour left out of their targets, so that shape has to be read
from the outline alone: 96% of the held-out patches then get their shape right (colour 97.7% vs 98.9%), and through
the whole pipeline the questions about a held-out pair go from 61% to 75% right (training/RESULTS.md).

Needs a dataset written by `python -m training.synthetic` on its lattice (the default), whose cells are the
preset's patches. Writes RUN/vision (a transformers CLIPVisionModel folder, safetensors, atomic), RUN/metrics.jsonl
and RUN/loss_curve.png; pass RUN/vision to stage 1 as `--vision-base`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from training.synthetic import COLOURS, SHAPES

HEADS = {"colour": ("background", *COLOURS), "shape": ("background", *SHAPES), "size": ("background", "big", "small"),
         "horizontal": ("left", "right"), "vertical": ("top", "bottom")}  # the last two: where the patch is


def to_gray(pixels: torch.Tensor, which: torch.Tensor, vision) -> torch.Tensor:
    """`pixels` (B, 3, H, W, normalized with the vision config's mean/std) with the images `which` (B,) turned to
    grey (ITU-R 601 luma), renormalized."""
    mean = torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.image_std).view(1, 3, 1, 1)
    rgb = pixels * std + mean
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(rgb)
    grey = (luma - mean) / std
    return torch.where(which.view(-1, 1, 1, 1), grey, pixels)


def patch_targets(rows: list[dict], grid: int) -> torch.Tensor:
    """(N, 5, grid*grid) class ids per patch for the heads of HEADS; 0 is background for colour, shape, size."""
    from training.synthetic import patch_halves, row_patches

    out = torch.zeros(len(rows), len(HEADS), grid * grid, dtype=torch.long)
    halves = patch_halves(grid)
    out[:, 3] = torch.tensor([HEADS["horizontal"].index(h) for h, _ in halves])
    out[:, 4] = torch.tensor([HEADS["vertical"].index(v) for _, v in halves])
    for i, row in enumerate(rows):
        for p, obj in enumerate(row_patches(row, grid, i)):
            if obj is not None:
                out[i, :3, p] = torch.tensor([HEADS["colour"].index(obj.colour), HEADS["shape"].index(obj.shape),
                                              HEADS["size"].index(obj.size)])
    return out


def load_split(json_path: Path, image_folder: Path | None, vision) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split, preprocessed as stage 2 does ("pad"), and their per-patch targets."""
    from sqllava_edge.image import preprocess
    from training.data import load_samples
    from training.synthetic import lattice

    grid = lattice(json_path, vision)
    rows = load_samples(json_path)
    folder = image_folder or json_path.parent / "images"
    pixels = torch.stack([torch.from_numpy(preprocess(folder / row["image"], vision, "pad")) for row in rows])
    return pixels, patch_targets(rows, grid)


class PatchHeads(torch.nn.Module):
    """Linear classifiers on the selected-layer patch features; thrown away after pretraining."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, len(classes)) for classes in HEADS.values())

    def forward(self, feats: torch.Tensor) -> list[torch.Tensor]:  # (B, P, D) -> [(B, P, C_k)]
        return [head(feats) for head in self.heads]


def evaluate(vision, heads: PatchHeads, pixels: torch.Tensor, targets: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """Per-patch accuracy of each head: colour, shape and size on object patches, position on every patch, and the
    colour head's background/object call on background patches."""
    hits, counts = torch.zeros(len(HEADS) + 1), torch.zeros(len(HEADS) + 1)
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            logits = heads(vision(pixels[start:start + batch]))
            tgt = targets[start:start + batch]  # (b, K, P)
            obj = tgt[:, 0] > 0
            for k, lg in enumerate(logits):
                where = obj if k < 3 else torch.ones_like(obj)
                hits[k] += ((lg.argmax(-1) == tgt[:, k]) & where).sum()
                counts[k] += where.sum()
            hits[-1] += ((logits[0].argmax(-1) == 0) & ~obj).sum()
            counts[-1] += (~obj).sum()
    names = [f"{name}_acc" for name in HEADS] + ["background_acc"]
    return {name: round(float(h / max(c, 1)), 4) for name, h, c in zip(names, hits, counts)}


def pretrain(args) -> Path:
    from tqdm import tqdm

    from sqllava_edge.config import get_preset
    from sqllava_edge.fileutil import atomic_dir
    from sqllava_edge.model import VisionTower
    from training.speed import adamw_kwargs
    from training.state import MetricsLog, plot_loss, stage0_start, stage0_step, warmup_cosine

    out = stage0_start(args.out, "vision", args.threads)
    config = get_preset(args.preset)
    if config.vision.layers_used < 1:
        raise ValueError(f"preset {config.name!r} selects the embeddings (no encoder layer runs); nothing to pretrain")
    pixels, targets = load_split(args.data, args.image_folder, config.vision)
    torch.manual_seed(args.seed)
    vision = VisionTower(config.vision)
    heads = PatchHeads(config.vision.hidden_size)
    params = list(vision.parameters()) + list(heads.parameters())  # layers past the selected one get no gradient
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, **adamw_kwargs(args.fused_adamw))
    scheduler = warmup_cosine(optimizer, args.max_steps)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / "metrics.jsonl", None)
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=args.max_steps, desc="stage 0 (vision pretraining)", unit="step", disable=not args.progress)
    start = time.time()
    for step in range(1, args.max_steps + 1):
        idx = torch.randint(0, len(pixels), (args.batch_size,), generator=gen)
        batch, tgt = pixels[idx], targets[idx]
        if args.gray_share > 0:
            gray = torch.rand(len(idx), generator=gen) < args.gray_share
            batch, tgt = to_gray(batch, gray, config.vision), tgt.clone()
            tgt[:, 0][gray[:, None] & (tgt[:, 0] > 0)] = -100  # an object's colour is not in a grey image
        logits = heads(vision(batch))
        parts = [F.cross_entropy(lg.flatten(0, 1), tgt[:, k].flatten()) for k, lg in enumerate(logits)]
        loss = sum(parts)
        loss.backward()
        grad_norm, lr = stage0_step(optimizer, scheduler, params)
        log.write({"step": step, "loss": loss.item(), **{f"loss_{n}": p.item() for n, p in zip(HEADS, parts)},
                   "lr": {"vision": lr}, "grad_norm": grad_norm, "images": len(idx),
                   "elapsed": time.time() - start, "cpu_s": time.process_time()})
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()
    vision.eval()
    report = {"stage": "0-vision", "steps": args.max_steps, "wall_s": round(time.time() - start, 1),
              "final_loss": round(loss.item(), 4)}
    if args.eval_data:
        eval_pixels, eval_targets = load_split(args.eval_data, args.eval_image_folder, config.vision)
        report["held_out"] = evaluate(vision, heads, eval_pixels, eval_targets)
    with atomic_dir(out / "vision") as tmp:
        vision.clip.save_pretrained(tmp, safe_serialization=True)
        (tmp / "pretrain.json").write_text(json.dumps({
            "trainer": "python -m training.pretrain_vision", "preset": config.name, "data": str(args.data),
            "heads": {k: list(v) for k, v in HEADS.items()}, "feature_layer": config.vision.layers_used, **report},
            indent=2))
    plot_loss(log.records(), out / "loss_curve.png", f"stage 0: {config.name} vision pretraining (per-patch labels)")
    print(json.dumps(report), flush=True)
    return out / "vision"


def main(argv: list[str] | None = None) -> Path:
    from training.state import add_stage0_options, check_stage0_loop

    parser = argparse.ArgumentParser(prog="python -m training.pretrain_vision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a synthetic split (stage2.json) with meta.objects")
    parser.add_argument("--image-folder", type=Path, default=None, help="images of --data (default: DATA/images)")
    parser.add_argument("--eval-data", type=Path, default=None, help="held-out split to report per-patch accuracy on")
    parser.add_argument("--eval-image-folder", type=Path, default=None, help="images of --eval-data (default: beside it)")
    parser.add_argument("--preset", default="tiny", help="model preset whose vision tower to build")
    parser.add_argument("--out", type=Path, required=True, help="run folder; the model goes to OUT/vision")
    parser.add_argument("--max-steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW LR (3%% warm-up, cosine to 0)")
    parser.add_argument("--gray-share", type=float, default=0.0,
                        help="share of training images shown in grey (their objects' colour is not a target): shape "
                             "features that do not depend on the colour, for unseen colour/shape pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the sampling")
    add_stage0_options(parser)
    args = parser.parse_args(argv)
    check_stage0_loop(parser, args)
    if not 0.0 <= args.gray_share <= 1.0:
        parser.error(f"--gray-share is a share of the images, in [0, 1]; got {args.gray_share}")
    return pretrain(args)


if __name__ == "__main__":
    main()
