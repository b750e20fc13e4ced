"""The quality floor of the automatic choice: artifacts whose recorded fidelity is below it are no candidates.

    floor = resolve_floor(max_quality_loss)              # None -> DEFAULT_FLOOR; a number -> max KL; "off" -> none
    verdicts = judge(manifest, "llm_gguf", floor)        # {precision: Verdict(kept, why)}
    kept = keep(source, "llm_gguf", artifacts)           # what runtimes.select's rule-based order may pick

What is judged is the task-free fidelity `python -m export` records per artifact (export/fidelity.py, the artifact's
`validation["fidelity"]`): against the fp32 PyTorch model on calibration pairs, the mean KL divergence (nats) of the
next-token distribution over the answer positions, and the top-1 agreement at the positions where fp32 is confident
(its top token holds >= CONFIDENT of the probability). A GGUF is scored with fp32 vision tokens as input, a vision
ONNX through the fp32 LLM, so each artifact carries its own loss.

Default floor: mean KL <= 0.05 nats and confident top-1 >= 97%, per artifact. Why these numbers: a greedy answer
changes only where the top token flips, and the floor allows at most 3 flips in 100 confident answer positions; a
short answer (the demo's are 1-3 tokens) then stays the same in well over 90% of cases. By Pinsker's inequality a
mean KL of 0.05 nats bounds the mean total-variation distance by sqrt(0.05 / 2) = 0.16: at a typical position a token
fp32 leads by more than 32 points of probability cannot flip. Positions where fp32 itself hesitates are left to KL: a
flip between two near-equal tokens is no quality loss (randomly initialised models have only such positions).

An explicitly requested precision always wins (the floor applies to automatic choices). If every artifact of a kind
is below the floor, the most faithful one is kept and the reason says so: the floor never leaves a bundle unloadable.
An artifact with no recorded fidelity (exported before it was measured) is kept, and the reason says to re-export.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENT = 0.5  # fp32 probability of its top token from which a top-1 flip counts against an artifact


@dataclass(frozen=True)
class QualityFloor:
    max_kl: float | None = 0.05  # nats, mean over answer positions; None = not checked
    min_top1: float | None = 0.97  # top-1 agreement at confident positions; None = not checked

    def __str__(self) -> str:
        parts = ([f"KL <= {self.max_kl:g} nats"] if self.max_kl is not None else []) + (
            [f"top-1 >= {self.min_top1:.0%}"] if self.min_top1 is not None else [])
        return " and ".join(parts) or "no floor"


DEFAULT_FLOOR = QualityFloor()
NO_FLOOR = QualityFloor(None, None)


def resolve_floor(max_quality_loss) -> QualityFloor:
    """None -> DEFAULT_FLOOR; a QualityFloor as is; a number -> that max mean KL (nats), top-1 floor as default;
    "off" / "none" / math.inf -> no floor."""
    if max_quality_loss is None:
        return DEFAULT_FLOOR
    if isinstance(max_quality_loss, QualityFloor):
        return max_quality_loss
    if isinstance(max_quality_loss, str):
        if max_quality_loss.strip().lower() in ("off", "none"):
            return NO_FLOOR
        try:
            max_quality_loss = float(max_quality_loss)
        except ValueError:
            raise ValueError(f"max_quality_loss {max_quality_loss!r} is neither a number (max KL in nats, e.g. 0.05) "
                             "nor 'off'") from None
    if isinstance(max_quality_loss, bool) or not isinstance(max_quality_loss, (int, float)) or not max_quality_loss >= 0:
        raise ValueError(f"max_quality_loss must be a KL divergence in nats >= 0 (e.g. 0.05), 'off', or a QualityFloor; "
                         f"got {max_quality_loss!r}")
    if math.isinf(max_quality_loss):
        return NO_FLOOR
    return QualityFloor(float(max_quality_loss), DEFAULT_FLOOR.min_top1)


@dataclass(frozen=True)
class Verdict:
    precision: str
    kept: bool
    why: str  # the numbers and what they were held against
    kl: float | None = None
    top1: float | None = None


def fidelity_of(artifact) -> dict | None:
    fidelity = (artifact.validation or {}).get("fidelity")
    return fidelity if isinstance(fidelity, dict) and "kl_mean" in fidelity else None


def numbers(fidelity: dict) -> str:
    """'KL 0.0123 nats, top-1 99.1% (confident 100.0%)' (+ vision cosine)."""
    text = f"KL {fidelity['kl_mean']:.4f} nats, top-1 {fidelity['top1_agreement']:.1%}"
    if fidelity.get("top1_confident") is not None:
        text += f" (confident {fidelity['top1_confident']:.1%})"
    if fidelity.get("cosine_mean") is not None:
        text += f", cosine {fidelity['cosine_mean']:.4f} mean / {fidelity['cosine_min']:.4f} min"
    return text


def _verdict(artifact, floor: QualityFloor) -> Verdict:
    fidelity = fidelity_of(artifact)
    if fidelity is None:
        return Verdict(artifact.precision, True, "no fidelity recorded (exported without it; re-export the bundle to "
                                                 "measure it)")
    kl, top1 = fidelity["kl_mean"], fidelity.get("top1_confident")
    problems = []
    if floor.max_kl is not None and kl > floor.max_kl:
        problems.append(f"KL {kl:.4f} nats > {floor.max_kl:g}")
    if floor.min_top1 is not None and top1 is not None and top1 < floor.min_top1:
        problems.append(f"confident top-1 {top1:.1%} < {floor.min_top1:.0%}")
    if problems:
        return Verdict(artifact.precision, False, f"{numbers(fidelity)}: below the quality floor ({'; '.join(problems)})",
                       kl, top1)
    return Verdict(artifact.precision, True, f"{numbers(fidelity)}: within the floor ({floor})", kl, top1)


def judge(manifest, kind: str, floor: QualityFloor) -> dict[str, Verdict]:
    """Every artifact of `kind` -> its verdict. If all are below the floor, the lowest-KL one is kept anyway."""
    verdicts = {a.precision: _verdict(a, floor) for a in manifest.find_all(kind)}
    if verdicts and not any(v.kept for v in verdicts.values()):
        best = min(verdicts.values(), key=lambda v: (v.kl, -(v.top1 or 0.0)))
        verdicts[best.precision] = Verdict(best.precision, True, f"{best.why}, but every {kind} is below it: the most "
                                           "faithful is kept", best.kl, best.top1)
    return verdicts


def keep(source, kind: str, artifacts: list) -> list:
    """The artifacts the automatic choice may consider (runtimes.select): those within the source's floor."""
    floor = source.quality_floor
    if floor is None or not source.is_bundle:
        return artifacts
    verdicts = judge(source.manifest, kind, floor)
    return [a for a in artifacts if verdicts.get(a.precision) is None or verdicts[a.precision].kept]


def allowed(manifest, kind: str, floor: QualityFloor | None):
    """precision -> bool for runtimes.tune.choose."""
    if floor is None:
        return lambda precision: True
    verdicts = judge(manifest, kind, floor)
    return lambda precision: verdicts.get(precision) is None or verdicts[precision].kept


def describe(manifest, floor: QualityFloor, speeds: dict[tuple[str, str], str] | None = None,
             chosen: dict[str, str] | None = None) -> str:
    """One line per candidate: kind, precision, speed (when tuning measured it), quality, kept or dropped and why.

    speeds: (kind, precision) -> text; chosen: kind -> the precision that runs."""
    speeds, chosen = speeds or {}, chosen or {}
    lines = [f"floor: {floor} (max_quality_loss)"]
    for kind, label in (("vision_onnx", "vision"), ("llm_gguf", "llm")):
        for precision, verdict in judge(manifest, kind, floor).items():
            mark = "chosen" if chosen.get(kind) == precision else "kept" if verdict.kept else "dropped"
            speed = speeds.get((kind, precision), "speed not measured")
            lines.append(f"{label} {precision:<7} {mark:<7} {speed}; {verdict.why}")
    return "\n".join(lines)


def first_answer_s(table: dict | None, vision_precision: str, llm_precision: str) -> float | None:
    """The tuning table's estimated first-answer time of a pairing (best threads / repacking / micro-batch of each),
    None when either was not measured to work."""
    if table is None:
        return None
    from runtimes import tune

    vision = next((v for v in tune.vision_options(table) if v.precision == vision_precision), None)
    llms = [o for o in tune.llm_options(table) if o.precision == llm_precision]
    if vision is None or not llms:
        return None
    return min(tune.first_answer_s(table, vision, o) for o in llms)


def combinations(manifest, table: dict | None = None, floor: QualityFloor = DEFAULT_FLOOR) -> list[dict]:
    """Every vision ONNX x GGUF pairing of a bundle: its fidelity as a pair (the GGUF's `with_vision` record: KL and
    top-1 vs fp32 PyTorch), its first-answer estimate from the tuning table, and whether both artifacts are within
    the floor."""
    vision_ok, llm_ok = judge(manifest, "vision_onnx", floor), judge(manifest, "llm_gguf", floor)
    out = []
    for vision in manifest.find_all("vision_onnx"):
        for gguf in manifest.find_all("llm_gguf"):
            pair = ((fidelity_of(gguf) or {}).get("with_vision") or {}).get(vision.precision) or {}
            out.append({"vision": vision.precision, "llm": gguf.precision, "kl_mean": pair.get("kl_mean"),
                        "top1_agreement": pair.get("top1_agreement"),
                        "first_answer_s": first_answer_s(table, vision.precision, gguf.precision),
                        "within_floor": vision_ok[vision.precision].kept and llm_ok[gguf.precision].kept})
    return out
