"""`python -m training ...` under torchrun, recording where each rank's parameters go (tests/test_training.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_probe.py REPORT_DIR TRAINING_ARGS...

Writes REPORT_DIR/rank<R>.json with:
  moves      parameter elements of every request, after the model is loaded in host memory, to place parameters on
             the training device: a Module.to(device) call (its whole parameter count) or FSDP moving one unit's
             parameters (torch.distributed.fsdp._init_utils._move_states_to_device);
  total      the model's parameter elements; units: each FSDP unit's own elements (what it gathers at once);
  local      parameter elements this rank holds after the wrap (its shards);
  collectives per optimizer step, by function (FSDP's all-gathers and reduce-scatters, the loss all-reduces).
On a CPU the "device" is the CPU too: what is counted is what is asked to be placed there, and when.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.fsdp._init_utils as fsdp_init
from torch import nn

from training import train as training

report_dir, argv = Path(sys.argv[1]), sys.argv[2:]
state = {"loaded": False, "moves": [], "units": [], "steps": []}
calls: Counter = Counter()

module_to = nn.Module.to


def recording_to(self, *args, **kwargs):
    device = torch._C._nn._parse_to(*args, **kwargs)[0]
    if state["loaded"] and device is not None:
        state["moves"].append(sum(p.numel() for p in self.parameters()))
    return module_to(self, *args, **kwargs)


move_states = fsdp_init._move_states_to_device


def recording_move(params, buffers, device):
    if state["loaded"]:
        state["moves"].append(sum(p.numel() for p in params))
    return move_states(params, buffers, device)


build_model = training.build_model


def recording_build(cfg, dist_info):
    built = build_model(cfg, dist_info)
    model = built[0]
    state["total"] = sum(p.numel() for p in model.parameters())
    state["loaded"] = True
    return built


wrap_parallel = training.wrap_parallel


def recording_wrap(cfg, dist_info, loss_module):
    from training.modeling import fsdp_units

    units = fsdp_units(loss_module.model)
    owned: Counter = Counter()

    def visit(module: nn.Module, owner: int) -> None:
        owned[owner] += sum(p.numel() for p in module.parameters(recurse=False))
        for child in module.children():
            visit(child, id(child) if child in units else owner)

    visit(loss_module, id(loss_module))
    state["units"] = sorted(owned.values(), reverse=True)
    engine = wrap_parallel(cfg, dist_info, loss_module)
    state["loaded"] = False  # what follows (the optimizer's state, saving) is not placement
    state["local"] = sum(p.numel() for p in engine.parameters())
    return engine


forward_backward = training.forward_backward


def recording_step(run, micro):
    before = Counter(calls)
    out = forward_backward(run, micro)
    state["steps"].append(dict(Counter(calls) - before))
    return out


def counting(name: str):
    real = getattr(dist, name)

    def call(*args, **kwargs):
        calls[name] += 1
        return real(*args, **kwargs)

    return call


for name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single",
             "reduce_scatter_tensor", "reduce_scatter", "all_reduce"):
    if hasattr(dist, name):  # FSDP's names for them vary across torch versions
        setattr(dist, name, counting(name))
nn.Module.to = recording_to
fsdp_init._move_states_to_device = recording_move
training.build_model, training.wrap_parallel = recording_build, recording_wrap
training.forward_backward = recording_step

training.main(argv)
report_dir.mkdir(parents=True, exist_ok=True)
rank = os.environ.get("RANK", "0")
(report_dir / f"rank{rank}.json").write_text(json.dumps({k: v for k, v in state.items() if k != "loaded"}))
