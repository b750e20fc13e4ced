"""The main job, end to end on the built-in `tiny` preset: data -> stand-ins for the pretrained bases (stage 0: a
ViT for CLIP, an LLM for Vicuna) -> the two-stage SQ-LLaVA training -> evaluation -> export -> Assistant ->
benchmark -> the HTTP server answering one request. `make demo` runs it.

Each step runs as its own command (the same commands the README shows), writes its output atomically, and records
a stamp holding the hash of its inputs; a rerun skips a step whose inputs are unchanged and whose output is there, so
Ctrl-C at any point followed by a rerun continues where it stopped, with the same results.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from training import demo_budget  # noqa: E402  (the training budget, shared with benchmarks/train.py)

STAGE0_VISION_STEPS = demo_budget.STEPS["0-vision"]
STAGE0_VISION_GRAY_SHARE = demo_budget.VISION_GRAY_SHARE
STAGE0_STEPS = demo_budget.STEPS["0-llm"]
STAGE1_STEPS = demo_budget.STEPS["1"]
STAGE2_STEPS = demo_budget.STEPS["2"]
# The held-out subset the checkpoint and every bundle combination are scored on (the same, so the rows compare)
EVAL_SUBSET = ["--max-images", "20", "--sq-images", "40", "--sq-per-image", "4"]
CALIBRATION_PAIRS = 16  # held-out images whose first question measures each artifact's fidelity at export


@dataclass
class Step:
    name: str
    title: str
    argv: list[str]
    output: Path
    inputs: list[Path] = field(default_factory=list)  # files or folders whose content the output depends on
    resume_flag: str | None = None  # appended when a partial output of an interrupted run can be continued


def tree_hash(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            if any(part.startswith(".") for part in path.relative_to(root.parent).parts):
                continue  # stamps, temporary folders
            digest.update(str(path.relative_to(root.parent)).encode())
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
    return digest.hexdigest()


def step_key(step: Step) -> str:
    code = [ROOT / "sqllava_edge", ROOT / "training", ROOT / "export", ROOT / "runtimes", ROOT / "benchmarks"]
    payload = json.dumps({"argv": step.argv[1:], "inputs": tree_hash(step.inputs), "code": tree_hash(code)})
    return hashlib.sha256(payload.encode()).hexdigest()


def run_step(step: Step, stamps: Path) -> bool:
    """Run `step` unless its stamp says the same inputs already produced its output. Returns True if it ran."""
    stamp = stamps / f"{step.name}.json"
    key = step_key(step)
    if stamp.is_file() and step.output.exists() and json.loads(stamp.read_text()).get("key") == key:
        print(f"\n== {step.title}: unchanged inputs, reusing {rel(step.output)}")
        return False
    argv = list(step.argv)
    running = stamps / f"{step.name}.running"
    interrupted = running.is_file() and running.read_text() == key
    if step.output.exists():
        if step.resume_flag and interrupted and (step.output / "checkpoint" / "training_state").exists():
            argv.append(step.resume_flag)  # same inputs, cut short last time: continue from its last checkpoint
        else:
            shutil.rmtree(step.output) if step.output.is_dir() else step.output.unlink()
    stamps.mkdir(parents=True, exist_ok=True)
    running.write_text(key)
    print(f"\n== {step.title}\n$ {' '.join(shlex.quote(a) for a in display(argv))}", flush=True)
    start = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "seconds": round(seconds, 1)}))
    os.replace(tmp, stamp)
    running.unlink()
    print(f"-- {step.title}: done in {seconds:.0f} s, wrote {rel(step.output)}")
    return True


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def display(argv: list[str]) -> list[str]:
    return ["python" if a == sys.executable else rel(Path(a)) if a.startswith(str(ROOT)) else a for a in argv]


def steps(out: Path) -> list[Step]:
    py = sys.executable
    data, s0v, s0, s1, s2 = out / "data", out / "stage0_vision", out / "stage0", out / "stage1", out / "stage2"
    bundle = out / "bundle"
    return [
        Step("data", "1/9 synthetic dataset", [py, "-m", "training.synthetic", str(data), "--n-train", "2000", "--n-eval", "100", "--seed", "0"], data),
        Step("stage0_vision", "2/9 stage 0: pretrain the tiny ViT on the training images (stands in for CLIP)",
             [py, "-m", "training.pretrain_vision", "--data", str(data / "stage2.json"), "--eval-data",
              str(data / "eval.json"), "--preset", "tiny", "--out", str(s0v), "--max-steps", str(STAGE0_VISION_STEPS),
              "--gray-share", str(STAGE0_VISION_GRAY_SHARE)],
             s0v, [data]),
        Step("stage0", "3/9 stage 0: pretrain the tiny LLM on the text with symbolic scenes, no images (stands in for Vicuna)",
             [py, "-m", "training.pretrain_llm", "--data", str(data / "stage2.json"), "--caption-data",
              str(data / "stage1.json"), "--scenes", "--scene-facts", "--bind-attention", "1:0,2:0", "--preset", "tiny", "--out", str(s0),
              "--max-steps", str(STAGE0_STEPS),
              "--eval-data", str(data / "eval.json")],
             s0, [data]),
        Step("stage1", "4/9 training stage 1 (prototype extractor + projector on captions, frozen base ViT and LLM)",
             [py, "-m", "training", "--stage", "1", "--preset", "tiny", "--llm-base", str(s0 / "llm"),
              "--vision-base", str(s0v / "vision"),
              "--data", str(data / "stage1.json"), "--image-folder", str(data / "images"), "--out", str(s1),
              "--max-steps", str(STAGE1_STEPS), "--save-every", "25"],
             s1, [data, s0v, s0], resume_flag="--resume"),
        Step("stage2", "5/9 training stage 2 (LLM-LoRA + ViT-LoRA + projector, self-questioning)",
             [py, "-m", "training", "--stage", "2", "--init", str(s1),
              "--data", str(data / "stage2.json"), "--image-folder", str(data / "images"), "--out", str(s2),
              "--max-steps", str(STAGE2_STEPS), "--save-every", "50"],
             s2, [data, s0v, s0, s1], resume_flag="--resume"),
        Step("evaluate", "6/9 held-out evaluation (QA accuracy, grounded-question rate over 160 questions)",
             [py, "-m", "training.evaluate", str(s2), "--data", str(data / "eval.json"),
              "--image-folder", str(data / "images"), *EVAL_SUBSET, "--out", str(out / "eval.json")],
             out / "eval.json", [data, s0v, s0, s2]),
        Step("export", "7/9 export bundle (vision ONNX fp32 + int8, GGUF f16 + q8_0 + q4_k_m, validated, fidelity vs "
                       f"fp32 on {CALIBRATION_PAIRS} held-out images)",
             [py, "-m", "export", str(s2 / "checkpoint"), "--out", str(bundle), "--vision-precision", "fp32", "int8",
              "--quant", "f16", "q8_0", "q4_k_m", "--calibration", str(data / "eval.json"),
              "--calibration-pairs", str(CALIBRATION_PAIRS)],
             bundle, [data, s0v, s0, s2]),
        Step("evaluate_bundle", "8/9 deployed accuracy: the same held-out evaluation on every vision x GGUF combination "
                                "of the bundle, through Assistant",
             [py, "-m", "training.evaluate", str(bundle), "--all", "--data", str(data / "eval.json"),
              "--image-folder", str(data / "images"), *EVAL_SUBSET, "--no-progress",
              "--out", str(out / "eval_bundle.json")],
             out / "eval_bundle.json", [data, bundle]),
    ]


def training_times(stamps: Path) -> str:
    """One line with the wall time of the stand-ins (stage 0) and of the two SQ-LLaVA stages, from the step stamps
    (a reused step keeps the time of the run that made it)."""
    seconds = {}
    for name in ("stage0_vision", "stage0", "stage1", "stage2"):
        stamp = stamps / f"{name}.json"
        seconds[name] = json.loads(stamp.read_text()).get("seconds") if stamp.is_file() else None
    if any(v is None for v in seconds.values()):
        return "training time: unknown until every training step has run"
    stand_ins, stages = seconds["stage0_vision"] + seconds["stage0"], seconds["stage1"] + seconds["stage2"]
    return (f"training time: stage 0 stand-ins {stand_ins:.0f} s, SQ-LLaVA stages 1 + 2 {stages:.0f} s "
            f"({stages / 60:.1f} min; the target is at most 10 min on a 2-core CPU), {stand_ins + stages:.0f} s in all")


def show_assistant(out: Path) -> tuple[str, str]:
    """Load the bundle with automatic backends (measured selection, quality floor), answer and self-question on 3
    held-out images -> the (vision, LLM) precisions it chose."""
    sys.path.insert(0, str(ROOT))
    from sqllava_edge import Assistant

    print("\n== 9/9 Assistant on held-out images")
    start = time.perf_counter()
    samples = json.loads((out / "data" / "eval.json").read_text())
    with Assistant.load(out / "bundle") as assistant:
        print(assistant.backends)
        chosen = (assistant.backends.vision_precision, assistant.backends.llm_precision)
        for sample in samples[:3]:
            image = out / "data" / "images" / sample["image"]
            turns = sample["conversations"]
            question = turns[0]["value"].replace("<image>", "").strip()
            print(f"\nimage: {rel(image)}")
            print(f"  Q: {question}\n  truth: {turns[1]['value']}\n  answer: {assistant.ask(image, question)}")
            result = assistant.self_question(image, n=3, seed=0)
            print(f"  description: {result.description}")
            for i, q in enumerate(result.questions, 1):
                print(f"  self-question {i}: {q}")
        show_structured(assistant, samples, out / "data" / "images")
    print(f"-- Assistant: done in {time.perf_counter() - start:.0f} s")
    return chosen


def deployed_rows(out: Path, chosen: tuple[str, str] | None) -> list[dict]:
    """PyTorch fp32 (the checkpoint's evaluation), then every deployed combination: QA accuracy, grounded rate, KL /
    top-1 vs fp32 (recorded at export), first-answer estimate (the tuning table Assistant.load used)."""
    from runtimes import quality
    from runtimes.model_source import ModelSource
    from runtimes.tune import read_cached, table_keys

    checkpoint = json.loads((out / "eval.json").read_text())
    rows = [{"name": "PyTorch fp32 (checkpoint)", "qa": checkpoint["qa"]["accuracy"],
             "questions": checkpoint["qa"]["questions"], "grounded": checkpoint["self_questioning"]["grounded_rate"],
             "kl_mean": 0.0, "top1_agreement": 1.0, "first_answer_s": None, "automatic": False}]
    source = ModelSource.open(out / "bundle", verify=False)
    table, _ = read_cached(table_keys(source))
    pairs = {(p["vision"], p["llm"]): p for p in quality.combinations(source.manifest, table)}
    for result in json.loads((out / "eval_bundle.json").read_text())["combinations"]:
        key = (result["vision"], result["llm"])
        pair = pairs.get(key, {})
        rows.append({"name": f"vision {key[0]} + GGUF {key[1]}", "qa": result["qa"]["accuracy"],
                     "questions": result["qa"]["questions"], "grounded": result["self_questioning"]["grounded_rate"],
                     "kl_mean": pair.get("kl_mean"), "top1_agreement": pair.get("top1_agreement"),
                     "first_answer_s": pair.get("first_answer_s"), "within_floor": pair.get("within_floor"),
                     "automatic": key == chosen})
    return rows


def deployed_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (printed, and written to demo_out/deployed.md for the README)."""
    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| model | QA accuracy | grounded | KL / top-1 vs fp32 | first answer (tuning) | |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        mark = "**automatic choice**" if r["automatic"] else ("below the quality floor" if r.get("within_floor") is False else "")
        lines.append(f"| {r['name']} | {cell(r['qa'], '.1%')} of {r['questions']} | {cell(r['grounded'], '.1%')} | "
                     f"{cell(r['kl_mean'], '.4f')} / {cell(r['top1_agreement'], '.1%')} | "
                     f"{cell(r['first_answer_s'], '.3f')} s | {mark} |".replace("- s |", "- |"))
    return "\n".join(lines)


def show_deployed(out: Path, chosen: tuple[str, str] | None) -> str:
    print("\n== deployed accuracy: the checkpoint, then every combination the bundle deploys")
    text = deployed_table(deployed_rows(out, chosen))
    print(text)
    (out / "deployed.md").write_text(text + "\n")
    return text


def watch_clip(bundle: Path, folder: Path) -> list:
    """`sqllava-edge watch`'s loop (Assistant.watch) on a 4-scene synthetic clip: a big circle that changes colour and
    place every second. Prints one answer per scene change with the truth beside it; returns the answers."""
    sys.path.insert(0, str(ROOT))
    from sqllava_edge import Assistant
    from sqllava_edge.video import write_video
    from training.synthetic import Obj, scene_clip

    def big(colour: str, shape: str, col: int, row: int) -> Obj:  # a 2 x 2 block of the 8 x 8 lattice
        return Obj(colour, shape, "big", (col + 1) / 8, (row + 1) / 8, 0.1)

    def small(colour: str, shape: str, col: int, row: int) -> Obj:
        return Obj(colour, shape, "small", (col + 0.5) / 8, (row + 0.5) / 8, 0.05)

    scenes = [[big("red", "circle", 1, 1), small("blue", "square", 6, 5)], [big("blue", "circle", 4, 3)],
              [big("yellow", "circle", 2, 5), small("purple", "star", 6, 1)], [big("green", "circle", 5, 1)]]
    frames, starts = scene_clip(scenes, 5, size=112, seed=0)
    clip = write_video(folder / "watch-clip.mp4", frames, fps=5)
    question = "What colour is the circle?"
    print(f"  clip: {rel(clip)} ({len(frames)} frames, 5 frames/s, scene changes at frames {starts})\n  Q: {question}")
    with Assistant.load(bundle) as assistant:
        answers = list(assistant.watch(clip, question))
    truths = {start: scene[0].colour for start, scene in zip(starts, scenes)}
    for a in answers:
        truth = f"   (truth: {truths[a.frame_index]})" if a.frame_index in truths else ""
        print(f"  {a.timestamp:4.1f} s  frame {a.frame_index:>2}  {a.latency * 1000:4.0f} ms  "
              f"{a.skipped_since_last} unchanged skipped  A: {a.answer}{truth}")
    return answers


def show_watch(out: Path) -> None:
    print("\n== watch: a standing question over a video (sqllava-edge watch BUNDLE clip.mp4 \"...\")")
    start = time.perf_counter()
    watch_clip(out / "bundle", out)
    print(f"-- watch: done in {time.perf_counter() - start:.0f} s")


def show_structured(assistant, samples: list[dict], images: Path, n_images: int = 40) -> dict:
    """JSON-schema answers about held-out images beside free-text answers about the same objects. For the first
    object of each image whose colour is unique there, two questions in the JSON form of `training.synthetic
    --json-rate` (JSON_QUESTIONS, schema JSON_SCHEMAS["object"]: colour and shape enums), one naming the object
    by its shape, one by its colour; and the two free-text questions "What colour is the <shape>?" and "What shape is
    the <colour> object?". The fields scored are the ones the question does not give away: the colour asked by shape,
    the shape asked by colour, in both forms; the fields it names (echoed back in the JSON) are reported apart.
    -> {"structured": ..., "free_text": ..., "echoed": ..., "fields": n, "target_met": structured >= free_text}."""
    from training.synthetic import JSON_QUESTIONS, JSON_SCHEMAS

    schema = JSON_SCHEMAS["object"]
    phrasing = JSON_QUESTIONS["object"][0]
    structured = free = echoed = fields = 0
    shown = False
    for sample in samples:
        objects = sample.get("meta", {}).get("objects", [])
        colours = [o["colour"] for o in objects]
        target = next((o for o in objects if colours.count(o["colour"]) == 1), None)
        if target is None:
            continue
        image = images / sample["image"]
        by_shape = phrasing.format(ref=target["shape"])
        by_colour = phrasing.format(ref=f"{target['colour']} object")
        answer = assistant.ask(image, by_shape, schema=schema, max_new_tokens=32)
        other = assistant.ask(image, by_colour, schema=schema, max_new_tokens=32)
        if not shown:
            print(f"\nstructured answer (JSON schema: colour and shape enums) about a held-out image\n"
                  f"image: {rel(image)}\n  Q: {by_shape}\n  schema answer: {json.dumps(answer)}\n"
                  f"  truth: colour {target['colour']}, shape {target['shape']}")
            shown = True
        structured += (answer["colour"] == target["colour"]) + (other["shape"] == target["shape"])
        echoed += (answer["shape"] == target["shape"]) + (other["colour"] == target["colour"])
        free += assistant.ask(image, f"What colour is the {target['shape']}?",
                              max_new_tokens=8).strip(" .").lower() == target["colour"]
        free += assistant.ask(image, f"What shape is the {target['colour']} object?",
                              max_new_tokens=8).strip(" .").lower() == target["shape"]
        fields += 2
        if fields >= 2 * n_images:
            break
    result = {"structured": structured / max(fields, 1), "free_text": free / max(fields, 1),
              "echoed": echoed / max(fields, 1), "fields": fields}
    result["target_met"] = fields > 0 and result["structured"] >= result["free_text"]
    if fields:
        verdict = "met" if result["target_met"] else "NOT met"
        print(f"  field accuracy on {fields // 2} held-out objects (the colour of the <shape>, the shape of the "
              f"<colour> object): JSON schema {result['structured']:.1%}, free text {result['free_text']:.1%}\n"
              f"  target JSON schema >= free text: {verdict}\n"
              f"  (fields the question names, echoed back in the JSON: {result['echoed']:.1%})")
    return result


def serve_once(bundle: Path, image: Path, question: str, port: int | None = None) -> str:
    """Start `sqllava-edge serve` on the bundle (127.0.0.1), ask one question through the official openai client,
    stop the server with SIGTERM and check it exits 0. -> the answer."""
    import signal
    import socket

    import httpx
    from openai import OpenAI

    from sqllava_edge.serve.protocol import data_uri

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "sqllava_edge.serve", str(bundle), "--port", str(port)]
    print("$ " + " ".join(display(cmd)), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SQLLAVA_EDGE_API_KEY", None)
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its messages above)")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="not-needed", max_retries=0)
        reply = client.chat.completions.create(model="demo", max_tokens=64, messages=[{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": data_uri(image.read_bytes(), "image/png")}}]}])
        answer = reply.choices[0].message.content
        print(f"  openai client -> POST /v1/chat/completions\n  Q: {question}\n  A: {answer}\n"
              f"  usage: {reply.usage.prompt_tokens} prompt positions (image rows included), "
              f"{reply.usage.completion_tokens} new tokens")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    if code != 0:
        raise RuntimeError(f"the server exited with code {code} after SIGTERM")
    print("  server stopped cleanly (SIGTERM, exit 0)")
    return answer


def show_server(out: Path) -> None:
    print("\n== serve: the OpenAI-compatible server on the bundle, one request through the openai client")
    sample = json.loads((out / "data" / "eval.json").read_text())[0]
    question = sample["conversations"][0]["value"].replace("<image>", "").strip()
    serve_once(out / "bundle", out / "data" / "images" / sample["image"], question)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out", help="where every step writes (default demo_out/)")
    parser.add_argument("--skip-benchmark", action="store_true", help="stop after the Assistant step")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    stamps = out / ".stamps"
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")  # two demos on one folder would train into the same checkpoint
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another demo is running with --out {rel(out)}; wait for it to finish or stop it first", file=sys.stderr)
        return 1
    total = time.perf_counter()
    try:
        for step in steps(out):
            run_step(step, stamps)
        print("\n" + training_times(stamps))
        chosen = show_assistant(out)
        show_watch(out)
        show_deployed(out, chosen)
        if not args.skip_benchmark:
            print("\n== benchmark (tiny bundle, every backend available here)")
            subprocess.run([sys.executable, "-m", "benchmarks", "--bundle", str(out / "bundle"), "--runs", "2",
                            "--out", str(out / "bench")], check=True, cwd=ROOT)
        show_server(out)
    except subprocess.CalledProcessError as exc:
        print(f"\nstep failed with exit code {exc.returncode}: {' '.join(display(list(exc.cmd)))}", file=sys.stderr)
        return exc.returncode or 1
    except KeyboardInterrupt:
        print("\ninterrupted: finished steps are kept; run `make demo` again to continue", file=sys.stderr)
        return 130
    print(f"\nDemo finished in {time.perf_counter() - total:.0f} s; everything is under {rel(out)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
