"""Which backends a run measures: `--backends auto|all|LIST` turned into combinations and vision-only sweeps.

LIST is comma-separated `VISION+LLM` pairs, each side `kind[:precision]`, e.g.
`onnxruntime:int8+llama.cpp:q4_k_m,torch+torch`. A side without a precision takes the one auto-selection would.
auto = the combination runtimes.select picks on this device. all = every vision option x every LLM option.
Vision options not in any combination are still measured alone (batch 1 and B, cosine), so the best vision backend
is always found.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VISION_KINDS = ("torch", "onnxruntime", "tensorrt")
LLM_KINDS = ("torch", "llama.cpp")


@dataclass(frozen=True)
class Spec:
    kind: str
    precision: str | None = None  # artifact precision; None: torch (the checkpoint, fp32) or "let select decide"

    @property
    def label(self) -> str:
        return self.kind if self.precision is None else f"{self.kind}:{self.precision}"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "precision": self.precision}

    @classmethod
    def parse(cls, text: str, kinds: tuple[str, ...], part: str) -> "Spec":
        kind, _, precision = text.strip().partition(":")
        if kind not in kinds:
            raise ValueError(f"unknown {part} backend {kind!r} in --backends; valid: {', '.join(kinds)}")
        return cls(kind, precision or None)


@dataclass(frozen=True)
class Combo:
    vision: Spec
    llm: Spec
    tuned: bool = False  # loaded as a user gets it: Assistant.load with nothing given, measured selection on

    @property
    def label(self) -> str:
        pair = f"{self.vision.label}+{self.llm.label}"
        return f"automatic ({pair}, measured settings)" if self.tuned else pair


def parse_backends(text: str) -> str | list[Combo]:
    """'auto', 'all', or the list of combinations."""
    text = text.strip()
    if text in ("auto", "all"):
        return text
    combos = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        vision, plus, llm = item.partition("+")
        if not plus:
            raise ValueError(f"--backends entry {item!r} must be VISION+LLM, e.g. onnxruntime:int8+llama.cpp:q4_k_m")
        combos.append(Combo(Spec.parse(vision, VISION_KINDS, "vision"), Spec.parse(llm, LLM_KINDS, "LLM")))
    if not combos:
        raise ValueError("--backends is empty; use auto, all, or VISION+LLM pairs")
    return combos


def _vision_options(source, device, has_checkpoint: bool) -> list[Spec]:
    options = [Spec("torch")] if has_checkpoint else []
    options += [Spec("onnxruntime", a.precision) for a in source.manifest.find_all("vision_onnx")]
    if device.has_gpu:
        options += [Spec("tensorrt", a.precision) for a in source.manifest.find_all("tensorrt_engine")]
    return options


def _llm_options(source, has_checkpoint: bool) -> list[Spec]:
    options = [Spec("llama.cpp", a.precision) for a in source.manifest.find_all("llm_gguf")]
    return options + ([Spec("torch")] if has_checkpoint else [])


def _resolve(combo: Combo, source, device) -> Combo:
    """Fill a missing precision with what runtimes.select would choose for that kind."""
    from runtimes import select

    vision, llm = combo.vision, combo.llm
    if vision.kind != "torch" and vision.precision is None:
        vision = Spec(vision.kind, select.choose_vision(source, device, vision.kind).artifact.precision)
    if llm.kind != "torch" and llm.precision is None:
        llm = Spec(llm.kind, select.choose_llm(source, device, llm.kind).artifact.precision)
    return Combo(vision, llm)


def plan(backends: str, bundle: Path, checkpoint: Path | None, device) -> tuple[list[Combo], list[Spec], list[str]]:
    """-> (combinations, vision-only specs, notes on what was chosen and why)."""
    from runtimes import select
    from runtimes.model_source import ModelSource

    source = ModelSource.open(bundle, verify=False)  # each job verifies what it loads
    notes: list[str] = []
    chosen = parse_backends(backends)
    if chosen == "auto":
        vision = select.choose_vision(source, device)
        llm = select.choose_llm(source, device)
        combos = [Combo(Spec(vision.kind.value, vision.artifact.precision), Spec(llm.kind.value, llm.artifact.precision))]
        notes += [f"auto vision: {vision.reason}", f"auto LLM: {llm.reason}"]
    elif chosen == "all":
        combos = [Combo(v, m) for v in _vision_options(source, device, checkpoint is not None)
                  for m in _llm_options(source, checkpoint is not None)]
    else:
        combos = [_resolve(c, source, device) for c in chosen]
    for combo in combos:
        if checkpoint is None and "torch" in (combo.vision.kind, combo.llm.kind):
            raise ValueError(f"{combo.label} needs the training checkpoint for its torch part; pass --checkpoint")
    in_combos = {c.vision for c in combos}
    vision_only = [v for v in _vision_options(source, device, False) if v not in in_combos]
    return combos, vision_only, notes
