"""Held-out evaluation on the synthetic task (training/synthetic.py), of a trained checkpoint or of what a bundle
deploys.

    python -m training.evaluate CKPT --data DATA/eval.json [--out report.json]            # PyTorch
    python -m training.evaluate BUNDLE --data DATA/eval.json [--vision-precision int8] [--llm-precision q8_0]
    python -m training.evaluate BUNDLE --data DATA/eval.json --all                       # every combination

1. QA: every question of every held-out image is asked on its own (`{system} USER: <image>\\n{q} ASSISTANT:`, the
   v1_sq template, greedy as docs/spec.md 5), and the answer is compared with the canonical one by exact match (case and a
   final full stop ignored). Reported per question type, with the chance level of guessing uniformly among the
   type's answers and the majority-answer baseline of this split.
2. Self-questioning (docs/spec.md 5.1): describe the image (greedy), then sample questions after `VUSER:` with the docs/spec.md 5
   sampling (T 1.2, top-k 300, top-p 0.95), each sample independent from the same prompt. A question is grounded
   when it is well-formed (it matches one of the dataset's question phrasings, with known colour/shape words) and
   every object it names is in the image. Sampling stops at EOS or after --max-question-tokens (default 48 instead of
   docs/spec.md 5's 300: no phrasing is half that long, so a longer sample is malformed either way).

A bundle runs through `sqllava_edge.Assistant` with the precisions given (or the automatic choice; --all: one load
per vision ONNX x GGUF pair the bundle holds), the questions of an image decoded together in one batch by the
engine, the self-questions as parallel forks (question k of image i samples with seed + i * per-image + k, as on the
checkpoint). That path imports no torch: it runs in the runtime-only install.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from training.synthetic import ANSWERS, COLOURS, QUESTION_GROUP, QUESTIONS, SHAPES


def normalize(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def _question_patterns() -> list[tuple[str, re.Pattern]]:
    out = []
    for kind, phrasings in QUESTIONS.items():
        for text in phrasings:
            pattern = re.escape(text).replace(r"\{ref\}", r"(?P<ref>[a-z ]+?)").replace(r"\{colour\}", r"(?P<colour>[a-z]+)")
            out.append((kind, re.compile(pattern)))
    return out


PATTERNS = _question_patterns()


def parse_question(text: str) -> tuple[str, dict[str, str]] | None:
    """-> (type, {"colour"?, "shape"?}) for a well-formed question, else None."""
    text = text.strip()
    for kind, pattern in PATTERNS:
        match = pattern.fullmatch(text)
        if not match:
            continue
        slots = match.groupdict()
        if "colour" in slots:
            return (kind, {"colour": slots["colour"]}) if slots["colour"] in COLOURS else None
        words = slots["ref"].split()
        if len(words) == 1 and words[0] in SHAPES:
            return kind, {"shape": words[0]}
        if len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES:
            return kind, {"colour": words[0], "shape": words[1]}
        if len(words) == 2 and words[0] in COLOURS and words[1] == "shape":
            return kind, {"colour": words[0]}
        return None
    return None


def grounded(refs: dict[str, str], objects: list[dict[str, Any]]) -> bool:
    return any(all(o[k] == v for k, v in refs.items()) for o in objects)


DESCRIBE_TOKENS = 96  # the greedy description the self-questions are conditioned on
GROUP = 8  # images whose questions (or descriptions) are decoded together on a bundle
BATCH_POSITIONS = 16384  # bundle: KV cells of all sequences together; sequences = this / (image rows + 192), <= 32


def _progress(items: Iterable, desc: str, unit: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # the runtime-only install has no tqdm
        return items
    return tqdm(items, desc=desc, unit=unit, disable=not enabled)


class _Batched:
    """Questions of several images decoded together through `Assistant` (its engine's sequences, one batched decode
    step per token), whichever backends it runs on."""

    assistant: Any
    config: Any

    @staticmethod
    def plan(config, sequences: int | None) -> tuple[int, int]:
        """(KV sequences, n_ctx) for evaluation batches: image rows + prompt + answer (or description) each."""
        per_sequence = min(config.llm.max_position_embeddings, config.num_image_tokens + 192)
        sequences = sequences or max(4, min(32, BATCH_POSITIONS // per_sequence))
        return sequences, sequences * per_sequence

    def answers_many(self, asked: list[tuple[Path, list[str]]], max_tokens: int) -> list[list[str]]:
        """Every question of several images, decoded together in batches of the engine's sequences."""
        from sqllava_edge.conversation import answer_prompt
        from sqllava_edge.generation import TASK_DEFAULTS

        assistant = self.assistant
        prompts = [[answer_prompt(assistant.tokenizer, q, assistant.template) for q in questions]
                   for _, questions in asked]
        flat = self._batched([path for path, _ in asked], prompts,
                             TASK_DEFAULTS["answer"].replace(max_new_tokens=max_tokens))
        out, at = [], 0
        for ids in prompts:
            out.append(flat[at:at + len(ids)])
            at += len(ids)
        return out

    def self_questions_many(self, paths: list[Path], n: int, seeds: list[int], max_tokens: int):
        """Greedy descriptions of several images decoded together, then each image's n questions as parallel forks
        (Assistant.self_question, question k with seed + k)."""
        from sqllava_edge.conversation import describe_prompt
        from sqllava_edge.generation import TASK_DEFAULTS

        assistant = self.assistant
        prompt = describe_prompt(assistant.tokenizer, assistant.template)
        descriptions = self._batched(paths, [[prompt] for _ in paths],
                                     TASK_DEFAULTS["describe"].replace(max_new_tokens=DESCRIBE_TOKENS))
        out = []
        for path, description, seed in zip(paths, descriptions, seeds):
            asked = assistant.self_question(path, n=n, seed=seed, description=description, max_new_tokens=max_tokens)
            out.append((description, asked.questions))
        return out

    def _batched(self, paths: list[Path], prompts: list[list[list[int]]], config) -> list[str]:
        """prompts[i]: the prompt ids asked about image paths[i] -> every answer, in order."""
        from runtimes.scheduler import Request
        from runtimes.tasks import texts as run

        assistant = self.assistant
        refs = [assistant.engine.image_ref(path) for path in paths]
        asked = [(ref, ids) for ref, group in zip(refs, prompts) for ids in group]
        out: list[str] = []
        for start in range(0, len(asked), assistant.engine.pool.capacity):  # decoded together, a sequence each
            batch = asked[start:start + assistant.engine.pool.capacity]
            out += run(assistant.scheduler, Request([ids for _, ids in batch], [ref for ref, _ in batch], config,
                                                    [None] * len(batch)))
        return out

    def close(self) -> None:
        self.assistant.close()


class Evaluator(_Batched):
    """A training checkpoint: the merged PyTorch model on the torch backends, through `Assistant` as a bundle is."""

    def __init__(self, checkpoint: str, device: str = "cpu", sequences: int | None = None):
        from runtimes.torch_llm import TorchLLM
        from runtimes.vision import TorchVision
        from sqllava_edge.assistant import Assistant
        from sqllava_edge.checkpoint import load_checkpoint, resolve_checkpoint

        model, tok = load_checkpoint(resolve_checkpoint(checkpoint), merge_lora=True, device=device)
        self.config = model.config
        sequences, n_ctx = self.plan(self.config, sequences)
        self.assistant = Assistant(TorchVision(model.eval()), TorchLLM(model.llm, n_ctx), tok, self.config,
                                   sequences=sequences)


class BundleEvaluator(_Batched):
    """A bundle through `Assistant` (no torch): an image's questions answered in batches of the engine's sequences."""

    def __init__(self, bundle: str | Path, vision_precision: str | None = None, llm_precision: str | None = None,
                 n_threads: int | None = None, sequences: int | None = None, max_quality_loss=None):
        from sqllava_edge.assistant import Assistant
        from sqllava_edge.bundle import read_manifest

        config = read_manifest(bundle, verify=False).config
        sequences, n_ctx = self.plan(config, sequences)
        self.assistant = Assistant.load(bundle, vision_precision=vision_precision, llm_precision=llm_precision,
                                        n_threads=n_threads, sequences=sequences, n_ctx=n_ctx,
                                        max_quality_loss=max_quality_loss)
        self.config = config

    @property
    def chosen(self) -> tuple[str, str]:
        backends = self.assistant.backends
        return backends.vision_precision, backends.llm_precision


def _groups(rows: list[dict]) -> list[list[dict]]:
    return [rows[i:i + GROUP] for i in range(0, len(rows), GROUP)]


def evaluate_qa(ev, rows: list[dict], folder: Path, max_tokens: int, progress: bool) -> dict[str, Any]:
    right, total, answers = Counter(), Counter(), defaultdict(Counter)
    examples = []
    for group in _progress(_groups(rows), "QA", "group", progress):
        asked = []
        for row in group:
            turns = row["conversations"]
            asked.append([(turns[j]["value"].replace("<image>", "").strip(), normalize(turns[j + 1]["value"]), kind)
                          for j, kind in zip(range(0, len(turns), 2), row["meta"]["types"])])
        said_all = ev.answers_many([(folder / row["image"], [q for q, _, _ in pairs]) for row, pairs in zip(group, asked)],
                                   max_tokens)
        for (question, truth, kind), said in zip([p for pairs in asked for p in pairs], [a for s in said_all for a in s]):
            said = normalize(said)
            group = QUESTION_GROUP[kind]
            total[group] += 1
            right[group] += said == truth
            answers[group][truth] += 1
            if len(examples) < 12:
                examples.append({"question": question, "truth": truth, "answer": said})
    per_type = {}
    for group in sorted(total):
        kinds = [k for k, g in QUESTION_GROUP.items() if g == group]
        choices = max(len(ANSWERS[k]) for k in kinds)
        per_type[group] = {"n": total[group], "accuracy": right[group] / total[group], "chance": 1 / choices,
                           "majority_baseline": answers[group].most_common(1)[0][1] / total[group]}
    n = sum(total.values())
    return {"questions": n, "accuracy": sum(right.values()) / max(n, 1), "per_type": per_type, "examples": examples}


def evaluate_sq(ev, rows: list[dict], folder: Path, per_image: int, max_tokens: int, seed: int,
                progress: bool) -> dict[str, Any]:
    counts, kinds, examples = Counter(), Counter(), []
    done = []
    for group in _progress(_groups(rows), "self-questioning", "group", progress):
        start = len(done)
        done += [(row, *out) for row, out in zip(group, ev.self_questions_many(
            [folder / row["image"] for row in group], per_image, [seed + (start + k) * per_image for k in range(len(group))],
            max_tokens))]
    for row, description, questions in done:
        for question in questions:
            parsed = parse_question(question)
            ok = parsed is not None and grounded(parsed[1], row["meta"]["objects"])
            counts.update(questions=1, well_formed=parsed is not None, grounded=ok)
            if parsed:
                kinds[QUESTION_GROUP[parsed[0]]] += 1
            if len(examples) < 12:
                examples.append({"image": row["image"], "description": description, "question": question,
                                 "well_formed": parsed is not None, "grounded": ok})
    n = max(counts["questions"], 1)
    return {"questions": counts["questions"], "grounded_rate": counts["grounded"] / n,
            "well_formed_rate": counts["well_formed"] / n, "question_types": dict(kinds), "examples": examples}


def is_bundle(path: str | Path) -> bool:
    from sqllava_edge.bundle import MANIFEST_FILE

    return (Path(path) / MANIFEST_FILE).is_file()


def combinations(bundle: str | Path) -> list[tuple[str, str]]:
    """Every (vision ONNX precision, GGUF precision) pair the bundle holds, in the manifest's order."""
    from sqllava_edge.bundle import read_manifest

    manifest = read_manifest(bundle, verify=False)
    return [(v.precision, g.precision) for v in manifest.find_all("vision_onnx") for g in manifest.find_all("llm_gguf")]


def read_rows(path: str | Path) -> list[dict]:
    """The held-out LLaVA JSON (no torch: training.data would import it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data {path} does not exist; make one with `python -m training.synthetic OUT`")
    rows = json.loads(path.read_text())
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path} must hold a non-empty JSON list of samples")
    return rows


def run_one(ev, rows: list[dict], folder: Path, args) -> dict[str, Any]:
    progress = not args.no_progress
    return {"qa": evaluate_qa(ev, rows[: args.max_images], folder, args.max_answer_tokens, progress),
            "self_questioning": evaluate_sq(ev, rows[: args.sq_images], folder, args.sq_per_image,
                                            args.max_question_tokens, args.seed, progress)}


def evaluate_bundle(args, rows: list[dict], folder: Path) -> dict[str, Any]:
    """One report per combination: those given, the automatic choice, or all of them (--all)."""
    import time

    pairs = combinations(args.model) if args.all else [(args.vision_precision, args.llm_precision)]
    results = []
    for vision, llm in pairs:
        started = time.perf_counter()
        ev = BundleEvaluator(args.model, vision, llm, args.threads, max_quality_loss=args.max_quality_loss)
        try:
            vision, llm = ev.chosen
            print(f"== bundle: vision {vision} + llm {llm}", flush=True)
            report = run_one(ev, rows, folder, args)
        finally:
            ev.close()
        report.update(vision=vision, llm=llm, seconds=round(time.perf_counter() - started, 1))
        _print(report)
        results.append(report)
    return {"bundle": str(args.model), "data": str(args.data), "combinations": results}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="bundle folder (python -m export), training run folder or checkpoint folder")
    parser.add_argument("--data", required=True, help="held-out LLaVA JSON with 'meta' (eval.json of training.synthetic)")
    parser.add_argument("--image-folder", help="default: <data folder>/images")
    parser.add_argument("--max-images", type=int, default=None, help="QA on at most this many images (default all)")
    parser.add_argument("--sq-images", type=int, default=40, help="images used for self-questioning")
    parser.add_argument("--sq-per-image", type=int, default=4, help="questions sampled per image")
    parser.add_argument("--max-answer-tokens", type=int, default=16, help="greedy answer length cap")
    parser.add_argument("--max-question-tokens", type=int, default=48, help="sampled question length cap")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the self-questions")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch, or the bundle's runtimes)")
    bundle = parser.add_argument_group("bundles")
    bundle.add_argument("--vision-precision", help="vision ONNX precision (default: the automatic choice)")
    bundle.add_argument("--llm-precision", help="GGUF precision (default: the automatic choice)")
    bundle.add_argument("--all", action="store_true", help="every vision ONNX x GGUF combination the bundle holds")
    bundle.add_argument("--max-quality-loss", help="quality floor of the automatic choice (Assistant.load)")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    rows = read_rows(args.data)
    if any("meta" not in r for r in rows):
        raise SystemExit(f"{args.data}: samples need the 'meta' record written by training.synthetic")
    folder = Path(args.image_folder) if args.image_folder else Path(args.data).parent / "images"
    if is_bundle(args.model):
        if args.all and (args.vision_precision or args.llm_precision):
            raise SystemExit("--all evaluates every combination: leave out --vision-precision / --llm-precision")
        report = evaluate_bundle(args, rows, folder)
        if len(report["combinations"]) > 1:
            print(format_combinations(report["combinations"]))
    else:
        if args.all or args.vision_precision or args.llm_precision:
            raise SystemExit(f"{args.model} is a training checkpoint: --all and the precisions apply to bundles")
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        ev = Evaluator(args.model)
        report = {"checkpoint": str(args.model), "data": str(args.data), **run_one(ev, rows, folder, args)}
        _print(report)
    if args.out:
        from sqllava_edge.fileutil import atomic_write

        with atomic_write(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


def format_combinations(results: list[dict]) -> str:
    lines = ["vision  llm      QA      grounded  well-formed  seconds"]
    for r in results:
        qa, sq = r["qa"], r["self_questioning"]
        lines.append(f"{r['vision']:<7} {r['llm']:<8} {qa['accuracy']:6.1%}  {sq['grounded_rate']:8.1%}  "
                     f"{sq['well_formed_rate']:11.1%}  {r['seconds']:7.1f}")
    return "\n".join(lines)


def _print(report: dict[str, Any]) -> None:
    qa, sq = report["qa"], report["self_questioning"]
    print(f"QA exact match: {qa['accuracy']:.1%} over {qa['questions']} questions")
    for kind, r in qa["per_type"].items():
        print(f"  {kind:9s} {r['accuracy']:6.1%}  (n={r['n']}, chance {r['chance']:.1%}, majority {r['majority_baseline']:.1%})")
    print(f"self-questioning: {sq['grounded_rate']:.1%} grounded, {sq['well_formed_rate']:.1%} well-formed over "
          f"{sq['questions']} questions; types {sq['question_types']}")


if __name__ == "__main__":
    main()
