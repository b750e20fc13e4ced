"""Training state inside a checkpoint (optimizer, scheduler, RNG, step, data position), the JSONL metrics log and
the loss-curve plot.

    CKPT/training_state/state.json        step, data position {epoch, step}, the TrainConfig, world size
    CKPT/training_state/optimizer.pt      optimizer.state_dict() (tensors, ints, floats: loads with weights_only=True)
    CKPT/training_state/scheduler.pt      scheduler.state_dict()
    CKPT/training_state/rng_rank{r}.pt    torch (CPU and CUDA), Python and numpy RNG states of rank r
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sqllava_edge.errors import CheckpointError

STATE_DIR = "training_state"


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2] or -1],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = list(state["python"])
    gauss = None if py[-1] == -1 else py[-1]
    random.setstate((py[-2], tuple(int(v) for v in py[:-2]), gauss))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))


def write_training_state(folder: Path, *, step: int, position: dict[str, int], train_config: dict[str, Any],
                         optimizer_state: dict, scheduler_state: dict, rng_states: list[dict], world_size: int) -> None:
    """Called with the checkpoint's temporary folder (save_checkpoint's `extra`), so it lands atomically with it."""
    out = folder / STATE_DIR
    out.mkdir()
    (out / "state.json").write_text(json.dumps({"step": step, "data_position": position, "world_size": world_size,
                                                "train_config": train_config}, indent=2))
    torch.save(optimizer_state, out / "optimizer.pt")
    torch.save(scheduler_state, out / "scheduler.pt")
    for rank, state in enumerate(rng_states):
        torch.save(state, out / f"rng_rank{rank}.pt")


def read_training_state(checkpoint: Path, rank: int) -> dict[str, Any]:
    folder = checkpoint / STATE_DIR
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{checkpoint} has no {STATE_DIR}/state.json: it cannot be resumed (was it written by "
                              "`python -m training`?). Start a new run, or pass it as --init for stage 2")
    state = json.loads((folder / "state.json").read_text())
    try:
        state["optimizer"] = torch.load(folder / "optimizer.pt", weights_only=True)
        state["scheduler"] = torch.load(folder / "scheduler.pt", weights_only=True)
        rng_file = folder / f"rng_rank{rank}.pt"
        state["rng"] = torch.load(rng_file, weights_only=True) if rng_file.is_file() else None
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{folder}: training state unreadable ({exc}); resume from an intact checkpoint") from None
    return state


class MetricsLog:
    """Append-only JSONL, one record per optimizer step; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        elif path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot_loss(records: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Training loss per step (raw and a 20-step moving average) to a PNG, rendered headless (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    if not steps:
        return None
    window = max(1, min(20, len(losses) // 5))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps[window - 1:], smooth, label=f"{window}-step mean")
    ax.set(xlabel="optimizer step", ylabel="token cross-entropy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def add_stage0_options(parser: argparse.ArgumentParser) -> None:
    """The options every stage-0 trainer takes besides its own: --fused-adamw, --threads, --no-progress."""
    parser.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                        help="PyTorch's fused AdamW kernel (default: on where this torch has it; training/speed.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def check_stage0_loop(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A parser error (exit 2) unless --max-steps and --batch-size are >= 1 and --lr > 0."""
    if args.max_steps < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--max-steps and --batch-size must be >= 1 and --lr > 0")


def stage0_start(out: Path, part: str, threads: int | None) -> Path:
    """Common start of the stage-0 trainers: thread count, and refuse to overwrite an earlier OUT/part."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    if (out / part).exists():
        raise FileExistsError(f"{out}/{part} exists; choose a new --out or delete it")
    return out


def warmup_cosine(optimizer, max_steps: int):
    """The stage-0 schedule: linear warm-up over 3% of the steps, then cosine to 0, stepped once per step."""
    warmup = max(1, int(0.03 * max_steps))
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def stage0_step(optimizer, scheduler, params) -> tuple[float, float]:
    """The stage-0 update after backward: clip the gradient norm to 1.0, step the optimizer and the schedule, clear
    the gradients. -> (gradient norm before clipping, the LR this step used)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
