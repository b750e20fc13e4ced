"""The runtime (Assistant on a bundle, the CLI, the server) imports no torch / transformers / peft.

Each check runs a child process whose `sitecustomize` puts a meta-path blocker first: importing any of BLOCKED
fails there, and every attempt is written to a log the test reads, so a module that merely *tries* torch (and falls
back) fails the test too. The parts that do need torch say which extra to install, in one line.
(.ci/run also runs this file in a virtual environment that has only the `runtime` extra.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sqllava_edge.config import get_preset
from tests.serve_helpers import THREADS, image

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "transformers", "peft", "accelerate", "sentencepiece", "safetensors", "onnx")

SITECUSTOMIZE = f'''
import importlib.abc, os, sys

BLOCKED = {BLOCKED!r}


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            with open(os.environ["SQLLAVA_BLOCK_LOG"], "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by tests/test_no_torch.py)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
'''

RUNTIME_SCRIPT = '''
import json, sys, urllib.request
from PIL import Image
from sqllava_edge import Assistant
from tests.serve_helpers import data_uri, png_bytes, serving

bundle, image_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
img = Image.open(image_path)
out = {}
with Assistant.load(bundle, vision_precision="fp32", n_threads=threads) as assistant:
    out["ask"] = assistant.ask(img, "What is in the image?", max_new_tokens=6)
    out["stream"] = "".join(assistant.stream(img, "What is in the image?", max_new_tokens=6))
    out["describe"] = assistant.describe(img, max_new_tokens=6)
    out["self_question"] = assistant.self_question(img, n=2, seed=0, max_new_tokens=6).questions
    chat = assistant.chat(img)
    out["chat"] = [chat.ask("Hi?", max_new_tokens=4), chat.ask("And?", max_new_tokens=4)]
    out["structured"] = assistant.ask(img, "Yes?", schema={"enum": ["yes", "no"]}, max_new_tokens=8)
with serving(bundle, parallel=1) as server:
    body = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in the image?"},
        {"type": "image_url", "image_url": {"url": data_uri(png_bytes(img))}}]}]}
    request = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        out["server"] = json.loads(response.read())["choices"][0]["message"]["content"]
    body.update(max_tokens=8, logprobs=True, response_format={"type": "json_schema", "json_schema": {
        "name": "yes_no", "schema": {"enum": ["yes", "no"]}}})
    request = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        out["server_structured"] = json.loads(json.loads(response.read())["choices"][0]["message"]["content"])
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps(out))
''' % (BLOCKED,)


def run_blocked(args: list[str], tmp_path: Path, stdin: str | None = None) -> tuple[subprocess.CompletedProcess, list]:
    """Run `python args...` with the blocker; returns the process and the blocked import attempts."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / f"blocked-{len(list(tmp_path.glob('blocked-*')))}.log"
    log.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "SQLLAVA_BLOCK_LOG": str(log)}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                          timeout=600)
    return proc, log.read_text().split()


def test_checkpoint_meta_and_release_names_import_without_torch(tmp_path):
    """A runtime may tell a checkpoint from a bundle (META_FILE, is_checkpoint, read_meta) and read the release name
    tables without torch installed: torch loads only inside the checkpoint functions that build a model."""
    code = ("import json, sys; from sqllava_edge.checkpoint import META_FILE, is_checkpoint, read_meta; "
            "from sqllava_edge.release.names import WEIGHT_STEMS, to_ours; "
            "print(json.dumps([META_FILE, is_checkpoint(sys.argv[1]), read_meta(sys.argv[1])['version'], "
            "list(WEIGHT_STEMS), to_ours('official_llm', 'model.layers.0.self_attn.q_proj.weight')[:2]]))")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "sqllava_edge.json").write_text(json.dumps({"format": "sqllava-edge-checkpoint", "version": 1}))
    proc, attempts = run_blocked(["-c", code, str(tmp_path / "ckpt")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert attempts == []
    assert json.loads(proc.stdout) == ["sqllava_edge.json", True, 1, ["model", "pytorch_model"],
                                       ["llm", "model.layers.0.self_attn.q_proj.weight"]]


def test_blocker_blocks(tmp_path):
    proc, attempts = run_blocked(["-c", "import torch"], tmp_path)
    assert proc.returncode != 0 and "blocked by tests/test_no_torch.py" in proc.stderr and attempts == ["torch"]


def test_assistant_and_server_import_no_torch(tiny_bundle, tmp_path):
    """load, ask, stream, describe, self_question, chat, a schema-constrained answer and server requests (one held to
    a JSON schema, with logprobs), with torch & co. unimportable."""
    image(0).save(tmp_path / "img.png")
    proc, attempts = run_blocked(["-c", RUNTIME_SCRIPT, str(tiny_bundle), str(tmp_path / "img.png"), str(THREADS)],
                                 tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert attempts == [] and out.pop("modules") == []
    assert all(isinstance(out[k], str) and out[k] for k in ("ask", "stream", "describe", "server"))
    assert out["stream"] == out["ask"]  # same prompt, greedy
    assert len(out["self_question"]) == 2 and len(out["chat"]) == 2
    assert out["structured"] in ("yes", "no") and out["server_structured"] in ("yes", "no")  # llguidance, no torch


@pytest.mark.parametrize("command,stdin", [
    (["inspect", "{bundle}"], None),
    (["ask", "{bundle}", "{image}", "What is it?", "--max-new-tokens", "4"], None),
    (["self-question", "{bundle}", "{image}", "--n", "2", "--max-new-tokens", "4", "--seed", "1"], None),
    (["interview", "{bundle}", "{image}", "--n", "1", "--max-new-tokens", "4", "--max-answer-tokens", "4"], None),
    (["chat", "{bundle}", "{image}", "--max-new-tokens", "4"], "Hello?\nAnd then?\n"),
])
def test_cli_imports_no_torch(tiny_bundle, tmp_path, command, stdin):
    image(1).save(tmp_path / "img.png")
    args = [a.format(bundle=tiny_bundle, image=tmp_path / "img.png") for a in command]
    if command[0] != "inspect":
        args += ["--threads", str(THREADS), "--vision-precision", "fp32"]
    proc, attempts = run_blocked(["-m", "sqllava_edge.cli", *args], tmp_path, stdin)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert attempts == [] and proc.stdout.strip()


@pytest.mark.parametrize("args,extra", [
    (["-m", "sqllava_edge.cli", "ask", "{ckpt}", "{ckpt}/x.png", "q"], "train"),  # a checkpoint: the torch backends
    (["-m", "export", "{ckpt}", "--out", "{ckpt}/bundle"], "export"),
    (["-m", "training.train", "--help"], "train"),
    (["-m", "sqllava_edge.convert", "--help"], "export"),
])
def test_torch_parts_say_which_extra_in_one_line(tmp_path, args, extra):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()  # a valid header: reading it needs no torch, loading the weights does
    (ckpt / "sqllava_edge.json").write_text(json.dumps({
        "format": "sqllava-edge-checkpoint", "version": 1, "config": get_preset("tiny").to_dict(),
        "base": {"llm": "llm", "vision": "vision"}, "lora": {"llm": None, "vision": None}, "provenance": {}}))
    proc, attempts = run_blocked([a.format(ckpt=ckpt) for a in args], tmp_path)
    assert proc.returncode == 1 and attempts
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and f"pip install 'sqllava-edge[{extra}]'" in proc.stderr


def test_bundle_evaluation_imports_no_torch(tiny_bundle, tmp_path):
    """`python -m training.evaluate BUNDLE` (deployed accuracy) runs in the runtime-only install."""
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "training.synthetic", str(data), "--n-train", "2", "--n-eval", "2"], cwd=ROOT,
                   check=True, capture_output=True, text=True)
    out = tmp_path / "report.json"
    proc, attempts = run_blocked(["-m", "training.evaluate", str(tiny_bundle), "--data", str(data / "eval.json"),
                                  "--vision-precision", "fp32", "--max-images", "1", "--sq-images", "1",
                                  "--sq-per-image", "2", "--max-answer-tokens", "3", "--max-question-tokens", "4",
                                  "--threads", str(THREADS), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert attempts == [] and "QA exact match" in proc.stdout
    (combo,) = json.loads(out.read_text())["combinations"]
    assert combo["vision"] == "fp32" and combo["qa"]["questions"] > 0 and combo["self_questioning"]["questions"] == 2
