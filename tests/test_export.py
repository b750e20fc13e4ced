"""Export: LoRA merge, vision ONNX (fp32/fp16/int8), TensorRT checks, the one-go bundle, reuse, bad input, inspect.

Tiny preset on CPU. The session checkpoint has random weights and random (non-zero) LoRA adapters on both the LLM
and the ViT, so merging changes the weights. GGUF numbers are tested in test_gguf (export.gguf); here only that the
one-go export calls it and records its artifacts.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import export.__main__ as export_main
import export.onnx as export_onnx
import export.pipeline as pipeline
import export.trt as export_trt
from export.pipeline import run_export
from export.merge import merge_checkpoint, merge_model
from sqllava_edge.bundle import MANIFEST_FILE, read_manifest
from sqllava_edge.checkpoint import load_checkpoint, save_checkpoint
from sqllava_edge.config import IMAGE_TOKEN_INDEX, get_preset
from sqllava_edge.errors import BundleError, CheckpointError
from sqllava_edge.model import SQLLaVA

REPO = Path(__file__).resolve().parents[1]
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # docs/spec.md 2.1
VIT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # docs/spec.md 2.2


def _tokenizer():
    from sqllava_edge.tokenizer import default_tokenizer

    return default_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model

    model = SQLLaVA.from_config(get_preset("tiny"), seed=0)
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, so the adapters really change the outputs.
    model.llm = get_peft_model(model.llm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                                     target_modules=LLM_TARGETS))
    model.vision.clip = get_peft_model(model.vision.clip, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                     init_lora_weights=False, target_modules=VIT_TARGETS))
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-lora"
    return save_checkpoint(folder, model, _tokenizer())


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    run_export(checkpoint, out, quants=[])
    return out


@pytest.fixture(scope="session")
def merged_model(checkpoint):
    model, _ = load_checkpoint(checkpoint, merge_lora=True)
    return model.eval()


def _probe(config, batch: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen)
    ids = torch.randint(3, config.llm.vocab_size, (batch, 20), generator=gen)
    ids[:, 0], ids[:, 5] = 1, IMAGE_TOKEN_INDEX
    return ids, pixels


def _leftovers(parent: Path, name: str) -> list[str]:
    """Temporary siblings (".name.tmp-...", ".name.old-...") left beside an output folder."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")) if parent.exists() else []


# ----------------------------------------------------------------------------------------------------------------
# Merge


def test_merged_checkpoint_equals_model_with_adapters(checkpoint, tmp_path):
    with_adapters, _ = load_checkpoint(checkpoint)
    assert hasattr(with_adapters.llm, "peft_config") and hasattr(with_adapters.vision.clip, "peft_config")
    ids, pixels = _probe(with_adapters.config, batch=2)
    with torch.no_grad():
        reference = with_adapters.eval()(ids, pixel_values=pixels).logits
        with with_adapters.llm.disable_adapter():  # the adapters matter: otherwise the test proves nothing
            no_llm_lora = with_adapters(ids, pixel_values=pixels).logits
    assert (reference - no_llm_lora).abs().max() > 1e-2

    merged_dir = merge_checkpoint(checkpoint, tmp_path / "merged", log=lambda _: None)
    meta = json.loads((merged_dir / "sqllava_edge.json").read_text())
    assert meta["lora"] == {"llm": None, "vision": None}
    assert meta["provenance"]["merge"]["logits_max_abs_diff"] <= 1e-4
    assert meta["provenance"]["merge"]["vision_max_abs_diff"] <= 1e-4  # the ViT-LoRA is checked on its own
    merged, _ = load_checkpoint(merged_dir)
    with torch.no_grad():
        logits = merged.eval()(ids, pixel_values=pixels).logits
    diff = (logits - reference).abs().max().item()
    print(f"merged vs adapters: logits max abs diff {diff:.3g}")
    assert diff <= 1e-4


def test_merged_llm_loads_in_transformers_as_plain_llama(checkpoint, tmp_path, merged_model):
    from transformers import LlamaForCausalLM

    merged_dir = merge_checkpoint(checkpoint, tmp_path / "merged", validate=False, log=lambda _: None)
    llama = LlamaForCausalLM.from_pretrained(str(merged_dir / "llm")).eval()
    assert not any("lora" in name for name, _ in llama.named_parameters())
    ids = torch.tensor([[1, 15043, 3186, 29892, 920, 526, 366]])
    with torch.no_grad():
        diff = (llama(ids).logits - merged_model.llm(ids).logits).abs().max().item()
    assert diff <= 1e-5


def test_merge_model_without_adapters_is_a_no_op():
    model = SQLLaVA.from_config(get_preset("tiny"), seed=0)
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    assert merge_model(model, log=lambda _: None)["merged"] == []
    assert all(torch.equal(before[k], v) for k, v in model.projector.state_dict().items())


# ----------------------------------------------------------------------------------------------------------------
# Vision ONNX


def _session(bundle: Path, precision: str):
    import onnxruntime as ort

    artifact = read_manifest(bundle).find("vision_onnx", precision)
    return ort.InferenceSession(str(bundle / artifact.path), providers=["CPUExecutionProvider"])


def _torch_embeds(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode_images(torch.from_numpy(pixels)).numpy()


def _token_cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_fp32_matches_pytorch(bundle, merged_model, batch):
    stored = read_manifest(bundle).find("vision_onnx", "fp32").validation
    assert stored[f"batch_{batch}"]["max_abs_diff"] <= 1e-4
    size = merged_model.config.vision.image_size
    pixels = np.random.default_rng(100 + batch).standard_normal((batch, 3, size, size)).astype(np.float32)
    out = _session(bundle, "fp32").run(["image_embeds"], {"pixel_values": pixels})[0]
    ref = _torch_embeds(merged_model, pixels)  # the model merged by load_checkpoint, not by the exporter
    assert out.shape == (batch, merged_model.config.num_image_tokens, merged_model.config.llm.hidden_size)
    diff = float(np.abs(out - ref).max())
    print(f"ONNX fp32 batch {batch}: max abs diff {diff:.3g}")
    assert diff <= 1e-4


def test_onnx_int8_cosine_and_fp16_reported(bundle, merged_model):
    manifest = read_manifest(bundle)
    int8, fp16 = manifest.find("vision_onnx", "int8").validation, manifest.find("vision_onnx", "fp16").validation
    print(f"int8 per-token cosine (stored): min {int8['cosine_min']:.5f} mean {int8['cosine_mean']:.5f}; "
          f"fp16 max abs diff {fp16['max_abs_diff']:.3g}, cosine min {fp16['cosine_min']:.6f}")
    assert int8["cosine_min"] >= 0.99 and fp16["passed"] and np.isfinite(fp16["max_abs_diff"])
    size = merged_model.config.vision.image_size
    pixels = np.random.default_rng(7).standard_normal((3, 3, size, size)).astype(np.float32)
    cos = _token_cosine(_session(bundle, "int8").run(None, {"pixel_values": pixels})[0], _torch_embeds(merged_model, pixels))
    print(f"int8 per-token cosine (fresh batch of 3): min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= 0.99


def test_onnx_graphs_have_the_contracted_shape_and_precision(bundle):
    import onnx

    manifest = read_manifest(bundle)
    T, H = manifest.num_image_tokens, manifest.embed_dim
    for precision in ("fp32", "fp16", "int8"):
        model = onnx.load(str(bundle / manifest.find("vision_onnx", precision).path), load_external_data=False)
        (inp,), (out,) = model.graph.input, model.graph.output
        in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        assert (inp.name, out.name) == ("pixel_values", "image_embeds")
        assert isinstance(in_dims[0], str) and in_dims[1:] == [3, 112, 112]  # dynamic batch only
        assert out_dims[1:] == [T, H]
        assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"AveragePool", "GlobalAveragePool", "NonZero", "Loop", "If"}  # no adaptive pooling / data-dependent shapes
        if precision == "fp16":
            big = [t for t in model.graph.initializer if np.prod(t.dims) >= 128 * 128]
            share = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in big) / len(big)
            assert share > 0.5, share  # the tower's matrices are fp16; the projector's stay fp32


def test_onnx_graphs_hold_no_stack_traces_or_builder_paths(bundle):
    """The exporter's per-node stack traces name the building checkout's files and line numbers: a bundle must not
    carry them (the same checkpoint gives the same bytes from any folder), while the name scopes int8 needs stay."""
    import onnx

    from export.onnx import STACK_TRACE

    manifest = read_manifest(bundle)
    checkout = str(Path(__file__).resolve().parents[1]).encode()
    for precision in ("fp32", "fp16", "int8"):
        path = bundle / manifest.find("vision_onnx", precision).path
        model = onnx.load(str(path), load_external_data=False)
        keys = {prop.key for node in model.graph.node for prop in node.metadata_props}
        assert STACK_TRACE not in keys and checkout not in path.read_bytes()
        if precision == "fp32":
            assert "pkg.torch.onnx.name_scopes" in keys


def test_validation_fails_beyond_tolerance_and_names_the_tensor(bundle, merged_model):
    from export.onnx_validate import Reference, validate_vision_onnx
    from sqllava_edge.errors import ExportValidationError

    inputs = export_onnx._validation_inputs(112)
    reference = Reference(export_onnx.vision_graph(merged_model, "fp32"), inputs)
    fp16 = bundle / read_manifest(bundle).find("vision_onnx", "fp16").path
    with pytest.raises(ExportValidationError, match="tensor image_embeds at batch 1.*exceeds the fp32 tolerance 0.0001"):
        validate_vision_onnx(fp16, "fp32", inputs, reference)  # fp16 numbers judged by the fp32 tolerance


def test_dispatch_differences_are_allowed_only_at_ties(merged_model):
    from export.onnx_validate import FP32_TIE_MARGIN, Reference, _compare, prototype_reference
    from sqllava_edge.errors import ExportValidationError

    graph = export_onnx.vision_graph(merged_model, "fp32")
    reference = Reference(graph, export_onnx._validation_inputs(112))  # also checks it equals model.py's forward
    _, best, margin = reference.free[1]
    with torch.no_grad():
        runner_up = prototype_reference(graph.projector, reference.feats[1])[3].numpy()  # (B, L)

    strong = np.unravel_index(np.argmax(margin), margin.shape)  # the clearest decision: sending it elsewhere is an error
    flipped = best.copy()
    flipped[strong] = runner_up[strong]
    with pytest.raises(ExportValidationError, match="tensor dispatch .* no tie"):
        _compare("g.onnx", "fp32", 3, reference.run(1, flipped)[0], flipped, reference, 1)

    weak = np.unravel_index(np.argmin(margin), margin.shape)  # a float32 tie: fine if the values follow that dispatch
    assert margin[weak] < FP32_TIE_MARGIN
    other = best.copy()
    other[weak] = runner_up[weak]
    numbers = _compare("g.onnx", "fp32", 3, reference.run(1, other)[0], other, reference, 1)
    assert numbers["dispatch_mismatches"] == 1 and numbers["max_abs_diff"] <= 1e-6
    assert numbers["unforced_max_abs_diff"] > 1e-3  # one flipped token moves the output: why dispatch is compared apart


def test_unknown_vision_precision_is_refused(merged_model, tmp_path):
    with pytest.raises(ValueError, match="fp32, fp16, int8"):
        export_onnx.export_vision_onnx(merged_model, tmp_path, ["bf16"])


# ----------------------------------------------------------------------------------------------------------------
# TensorRT


def test_trt_check_passes_on_our_graphs(bundle, capsys):
    manifest = read_manifest(bundle)
    for precision in ("fp32", "fp16"):
        report = export_trt.check_onnx(bundle / manifest.find("vision_onnx", precision).path)
        assert report.ok, report.summary()
        assert report.opset <= export_trt.TRT_MAX_OPSET and "MatMul" in report.ops
    assert export_trt.main([str(bundle), "--check"]) == 0
    assert "OK" in capsys.readouterr().out


def _graph_with(tmp_path: Path, op: str, domain: str = "", opset: int = 17) -> Path:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node(op, ["r"], ["y"], name="odd", domain=domain)]
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=opsets)
    path = tmp_path / f"{op}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("op,domain,opset,expected", [
    ("Unique", "", 17, "operator Unique is not supported"),
    ("Gelu", "com.microsoft", 17, "com.microsoft::Gelu is a custom-domain operator"),
    ("Relu", "", 21, "opset 21 is outside 9..20"),
])
def test_trt_check_flags_what_tensorrt_cannot_parse(tmp_path, capsys, op, domain, opset, expected):
    path = _graph_with(tmp_path, op, domain, opset)
    report = export_trt.check_onnx(path)
    assert not report.ok and any(expected in p for p in report.problems), report.problems
    assert export_trt.main([str(path), "--check"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_trt_check_flags_the_int8_graph(bundle):
    report = export_trt.check_onnx(bundle / read_manifest(bundle).find("vision_onnx", "int8").path)
    assert not report.ok and any("MatMulInteger" in p for p in report.problems)


def test_trt_without_tensorrt_says_what_to_install(bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, even where it is installed
    assert export_trt.main([str(bundle), "--max-batch", "4"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pip install tensorrt" in err and "JetPack" in err and "--check" in err


def test_trt_without_gpu_says_where_to_build(bundle, monkeypatch, capsys):
    monkeypatch.setattr(export_trt, "require_tensorrt", lambda: object())
    monkeypatch.setattr(export_trt, "cuda_driver_devices", lambda: [])
    assert export_trt.main([str(bundle)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_trt_older_than_10_names_jetpack_6_1(bundle, monkeypatch, capsys):
    """JetPack 6.0 ships TensorRT 8.6, which has no STRONGLY_TYPED network flag: a one-line error, not a traceback."""
    old = type(sys)("tensorrt")
    old.__version__ = "8.6.2.3"
    old.NetworkDefinitionCreationFlag = type("Flags", (), {"EXPLICIT_BATCH": 0})  # what 8.6 has: no STRONGLY_TYPED
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    monkeypatch.setattr(export_trt, "cuda_driver_devices", lambda: [{"index": 0, "name": "Orin", "compute_capability": "8.7"}])
    assert export_trt.main([str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert "TensorRT 8.6.2.3 is too old" in err and "JetPack 6.1" in err and len(err.splitlines()) == 1


def test_trt_failed_validation_leaves_no_files(bundle, tmp_path, monkeypatch):
    """The engine and timing cache appear only after validation passes, like every other artifact."""
    from sqllava_edge.errors import ExportValidationError

    work = tmp_path / "bundle"
    shutil.copytree(bundle, work)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    trt = type(sys)("tensorrt")
    trt.__version__ = "10.3.0"
    monkeypatch.setattr(export_trt, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(export_trt, "cuda_driver_devices", lambda: [AGX_ORIN])
    monkeypatch.setattr(export_trt, "_build_serialized", lambda *args: (b"engine bytes", b"timing cache"))

    def fail(*args):
        raise ExportValidationError("TensorRT engine: mean per-token cosine 0.5000 vs the fp32 ONNX")

    monkeypatch.setattr(export_trt, "_validate_engine", fail)
    with pytest.raises(ExportValidationError, match="cosine"):
        export_trt.build_engine(work, max_batch=2, log=lambda line: None)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    assert read_manifest(work, verify=True).find("tensorrt_engine") is None


# cuDeviceGet* on two Orin modules: the same name and compute capability, different multiprocessors and memory
AGX_ORIN = {"index": 0, "name": "Orin", "compute_capability": "8.7", "multiprocessors": 16, "pci_bus_id": "",
            "total_memory": 64_335_241_216}
ORIN_NANO = {**AGX_ORIN, "multiprocessors": 8, "total_memory": 7_990_161_408}


def _builder_trt(state: dict):
    """The TensorRT 10 builder calls _build_serialized makes. The timing cache behaves as TensorRT documents it: with
    ignore_mismatch=False, set_timing_cache returns False for a cache recorded on another device."""
    trt = type(sys)("tensorrt")
    trt.__version__ = "10.3.0"
    timings = lambda: f"timings on {state['device']}".encode()  # noqa: E731

    class Cache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return self.data or timings()

    class Config:
        cache = None

        def set_memory_pool_limit(self, pool, size):
            pass

        def create_timing_cache(self, data):
            state["offered"].append(bytes(data))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            accepted = ignore_mismatch or cache.data in (b"", timings())
            self.cache = cache if accepted else self.cache
            return accepted

        def add_optimization_profile(self, profile):
            pass

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return type("Profile", (), {"set_shape": lambda self, *args: None})()

        def build_serialized_network(self, network, config):
            return f"engine for {state['device']}".encode()

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = type("Flags", (), {"STRONGLY_TYPED": 3})
    trt.MemoryPoolType = type("Pools", (), {"WORKSPACE": 0})
    trt.Builder, trt.OnnxParser = Builder, Parser
    return trt


def test_trt_engines_and_timing_caches_are_per_device_key(bundle, tmp_path, monkeypatch):
    """An AGX Orin and an Orin Nano (both "Orin", 8.7) building into one bundle keep both engines, each with its own
    timing cache; a cache TensorRT refuses (recorded on another device) is replaced by a fresh one, not ignored."""
    work = tmp_path / "bundle"
    shutil.copytree(bundle, work)
    state, lines = {"device": "agx", "offered": []}, []
    monkeypatch.setattr(export_trt, "require_tensorrt", lambda: _builder_trt(state))
    monkeypatch.setattr(export_trt, "_validate_engine", lambda *args: {"passed": True})
    monkeypatch.setattr(export_trt, "jetson_release", lambda: {"l4t": None, "jetpack": None,
                                                               "board": "NVIDIA Jetson (tegra234)"})  # a container
    monkeypatch.setattr(export_trt, "cuda_driver_devices", lambda: [AGX_ORIN])
    agx = export_trt.build_engine(work, max_batch=2, log=lines.append)
    agx_cache = next(name for name in agx.files if name.endswith(".timing-cache"))
    # what a shared bundle may hold: another device's cache where the Nano's goes (not in the manifest yet)
    nano_stem = f"trt/vision.{export_trt.engine_stem(export_trt.device_key(ORIN_NANO))}.trt10.3.0"
    shutil.copy(work / agx_cache, work / f"{nano_stem}.timing-cache")
    state["device"] = "nano"
    monkeypatch.setattr(export_trt, "cuda_driver_devices", lambda: [ORIN_NANO])
    nano = export_trt.build_engine(work, max_batch=2, log=lines.append)
    engines = read_manifest(work, verify=True).find_all("tensorrt_engine")
    assert sorted(e.path for e in engines) == sorted([agx.path, nano.path]) and agx.path != nano.path
    assert [e.target["device_key"]["multiprocessors"] for e in engines] == [16, 8]
    assert nano.path == f"{nano_stem}.engine" and (work / nano.path).read_bytes() == b"engine for nano"
    assert state["offered"] == [b"", b"timings on agx", b""]  # refused, then a fresh cache
    assert any("refused the timing cache" in line for line in lines)
    assert (work / f"{nano_stem}.timing-cache").read_bytes() == b"timings on nano"
    assert (work / agx_cache).read_bytes() == b"timings on agx"
    state["device"] = "agx"  # rebuilding on the AGX replaces its own entry only, reusing its own cache
    monkeypatch.setattr(export_trt, "cuda_driver_devices", lambda: [AGX_ORIN])
    export_trt.build_engine(work, max_batch=2, log=lines.append)
    assert len(read_manifest(work, verify=True).find_all("tensorrt_engine")) == 2
    assert state["offered"][-1] == b"timings on agx"


@pytest.mark.parametrize("argv", [["B", "--max-batch", "0"], ["B", "--workspace-gb", "-1"], ["B", "--max-batch", "x"], []])
def test_trt_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        export_trt.main(argv)
    assert exc.value.code == 2


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_jetson_release_parsing(tmp_path):
    root = _tree(tmp_path / "nano", {
        "etc/nv_tegra_release": b"# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n",
        "proc/device-tree/model": b"NVIDIA Jetson Orin Nano Developer Kit\x00"})
    assert export_trt.jetson_release(root) == {"l4t": "36.4.3", "jetpack": "6.2",
                                               "board": "NVIDIA Jetson Orin Nano Developer Kit"}
    assert export_trt.jetson_release(tmp_path / "absent") is None


def test_jetson_release_knows_36_4_7_and_containers(tmp_path):
    nx = _tree(tmp_path / "nx", {"etc/nv_tegra_release": b"# R36 (release), REVISION: 4.7, GCID: 1, BOARD: generic\n",
                                 "proc/device-tree/model": b"NVIDIA Orin NX Developer Kit\x00",
                                 "proc/device-tree/compatible": b"nvidia,p3768-0000+p3767-0000\x00nvidia,tegra234\x00"})
    assert export_trt.jetson_release(nx) == {"l4t": "36.4.7", "jetpack": "6.2.1", "board": "NVIDIA Orin NX Developer Kit"}
    # an l4t container: no /etc/nv_tegra_release and /proc/device-tree masked, but /sys/devices/soc0 is visible
    container = _tree(tmp_path / "container", {"sys/devices/soc0/family": b"Tegra\n", "sys/devices/soc0/soc_id": b"35\n"})
    assert export_trt.jetson_release(container) == {"l4t": None, "jetpack": None, "board": "NVIDIA Jetson (tegra234)"}


def _gpu_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "needs TensorRT (not installable on this CPU machine: PyPI's tensorrt downloads from NVIDIA)"
    if not export_trt.cuda_driver_devices():
        return "needs an NVIDIA GPU / Jetson"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
def test_trt_engine_builds_and_is_recorded(bundle, tmp_path):
    work = tmp_path / "bundle"
    shutil.copytree(bundle, work)
    artifact = export_trt.build_engine(work, max_batch=2, log=print)
    manifest = read_manifest(work)
    assert manifest.find("tensorrt_engine", "fp16") == artifact
    assert artifact.target["tensorrt"] and artifact.target["compute_capability"]
    assert artifact.validation.get("passed") or "skipped" in artifact.validation


# ----------------------------------------------------------------------------------------------------------------
# The bundle, reuse, inspect


def test_bundle_manifest_is_complete_and_verified(bundle, checkpoint):
    manifest = read_manifest(bundle, verify=True)
    assert manifest.num_image_tokens == 64 and manifest.embed_dim == 256 and manifest.template == "v1_sq"
    assert manifest.special_tokens == {"bos": 1, "eos": 2, "pad": 0, "unk": 0}
    assert manifest.preprocessing["image_size"] == 112 and manifest.preprocessing["mode"] == "pad"
    assert manifest.config == get_preset("tiny")
    assert {(a.kind, a.precision) for a in manifest.artifacts} == {
        ("vision_onnx", "fp32"), ("vision_onnx", "fp16"), ("vision_onnx", "int8"), ("tokenizer", "")}
    assert all(a.inputs_key and a.size > 0 for a in manifest.artifacts)
    prov = manifest.provenance
    from export import checkpoint_digest

    assert prov["source_sha256"] == checkpoint_digest(checkpoint)
    assert prov["merge"]["merged"] == ["llm", "vision"] and prov["merge"]["logits_max_abs_diff"] <= 1e-4
    assert prov["tools"]["torch"].startswith("2.") and prov["tools"]["onnxruntime"] != "-"
    from sqllava_edge.tokenizer import load_tokenizer

    assert load_tokenizer(bundle / manifest.find("tokenizer").path).encode("Hello world", add_bos=True) == [1, 15043, 3186]


def test_reexport_reuses_artifacts(bundle, checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    before = read_manifest(out)
    inodes = {name: (out / name).stat().st_ino for a in before.artifacts for name in a.files}
    calls = []
    monkeypatch.setattr(export_onnx, "export_vision_onnx", lambda *a, **k: calls.append("onnx"))
    monkeypatch.setattr(pipeline, "_load_merged", lambda *a, **k: calls.append("load"))
    after = run_export(checkpoint, out, quants=[], log=lambda _: None)
    assert calls == []
    assert [(a.path, a.sha256) for a in after.artifacts] == [(a.path, a.sha256) for a in before.artifacts]
    assert {name: (out / name).stat().st_ino for name in inodes} == inodes  # the very same files, hard-linked
    assert len(after.provenance["reused"]) == 4
    monkeypatch.undo()

    # A tampered artifact is not reused: only it is exported again.
    fp16 = out / after.find("vision_onnx", "fp16").path
    fp16.write_bytes(fp16.read_bytes() + b"x")
    exported = []
    real = export_onnx.export_vision_onnx
    monkeypatch.setattr(export_onnx, "export_vision_onnx", lambda m, d, p, **k: exported.append(list(p)) or real(m, d, p, **k))
    again = run_export(checkpoint, out, quants=[], log=lambda _: None)
    assert exported == [["fp16"]]
    assert again.find("vision_onnx", "fp16").sha256 == before.find("vision_onnx", "fp16").sha256  # deterministic export
    read_manifest(out, verify=True)


@pytest.mark.parametrize("same_onnx", [True, False], ids=["kept", "dropped"])
def test_reexport_keeps_a_device_engine_built_from_the_same_onnx(bundle, checkpoint, tmp_path, same_onnx):
    from sqllava_edge.bundle import Artifact, write_manifest

    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    manifest = read_manifest(out)
    fp16 = manifest.find("vision_onnx", "fp16")
    (out / "trt").mkdir()
    (out / "trt" / "vision.orin.trt10.3.engine").write_bytes(b"engine bytes")
    key = fp16.sha256[fp16.path] if same_onnx else "0" * 64
    manifest.add(Artifact.from_files(out, "tensorrt_engine", "trt/vision.orin.trt10.3.engine",
                                     ["trt/vision.orin.trt10.3.engine"], "fp16", {}, {"gpu": "Orin"}, inputs_key=key))
    write_manifest(out, manifest)
    after = run_export(checkpoint, out, quants=[], log=lambda _: None)
    assert (after.find("tensorrt_engine") is not None) == same_onnx
    assert (out / "trt" / "vision.orin.trt10.3.engine").exists() == same_onnx
    read_manifest(out, verify=True)


def test_inspect_prints_and_detects_tampering(bundle, tmp_path, capsys):
    from sqllava_edge.cli import main

    assert main(["inspect", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "vision/vision.int8.onnx" in text and "sha256 ok" in text and "cosine_min" in text
    assert main(["inspect", str(bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["schema_version"] == 1

    work = tmp_path / "tampered"
    shutil.copytree(bundle, work)
    target = work / read_manifest(work).find("vision_onnx", "fp32").files[-1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert main(["inspect", str(work)]) == 1
    captured = capsys.readouterr()
    assert "MODIFIED/MISSING" in captured.out and "was modified or corrupted" in captured.err
    with pytest.raises(BundleError, match="modified or corrupted"):
        read_manifest(work)


def test_cli_entry_point_runs_as_a_module(bundle):
    result = subprocess.run([sys.executable, "-m", "sqllava_edge.cli", "inspect", str(bundle)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "tiny" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing half-written


def _corrupt_meta(folder: Path) -> None:
    (folder / "sqllava_edge.json").write_text("{ not json")


def _truncate_weights(folder: Path) -> None:
    path = folder / "llm" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def _shape_mismatch(folder: Path) -> None:
    meta = json.loads((folder / "sqllava_edge.json").read_text())
    meta["config"]["llm"]["intermediate_size"] = 512  # the weights are 768 wide
    (folder / "sqllava_edge.json").write_text(json.dumps(meta))


def _missing_projector(folder: Path) -> None:
    (folder / "projector.safetensors").unlink()


@pytest.mark.parametrize("damage,error,match", [
    (_corrupt_meta, CheckpointError, "not valid JSON"),
    (_truncate_weights, CheckpointError, "cannot load base llm"),
    (_shape_mismatch, CheckpointError, "intermediate_size is 768 but the model config says 512"),
    (_missing_projector, CheckpointError, "projector weights missing"),
], ids=["corrupt-meta", "truncated-weights", "shape-mismatch", "missing-projector"])
def test_bad_checkpoint_gives_clear_error_and_no_bundle(checkpoint, tmp_path, damage, error, match):
    broken = tmp_path / "ckpt"
    shutil.copytree(checkpoint, broken)
    damage(broken)
    out = tmp_path / "out" / "bundle"
    with pytest.raises(error, match=match):
        run_export(broken, out, quants=[], vision_precisions=["fp32"], log=lambda _: None)
    assert not out.exists() and _leftovers(out.parent, "bundle") == []


def test_missing_checkpoint_and_unknown_quant(checkpoint, tmp_path, capsys):
    out = tmp_path / "bundle"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_export(tmp_path / "nope", out, quants=[])
    with pytest.raises(ValueError, match="unknown quant type.*q3_xyz.*q4_k_m"):
        run_export(checkpoint, out, quants=["q3_xyz"])
    assert export_main.main([str(checkpoint), "--out", str(out), "--quant", "q3_xyz"]) == 1
    assert "unknown quant type" in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_replace_a_folder_that_is_not_a_bundle(checkpoint, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a sqllava-edge bundle"):
        run_export(checkpoint, precious, quants=[])
    assert (precious / "notes.txt").read_text() == "keep me"


def test_full_disk_midway_leaves_no_half_written_bundle(checkpoint, tmp_path, monkeypatch):
    def full_disk(graph, path, image_size):  # the ONNX writer runs out of space after writing part of its file
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_onnx, "export_graph", full_disk)
    out = tmp_path / "bundle"
    with pytest.raises(OSError, match="no space left on the device.*Nothing was written") as exc:
        run_export(checkpoint, out, quants=[], vision_precisions=["fp32"], log=lambda _: None)
    assert exc.value.errno == errno.ENOSPC
    assert not out.exists() and _leftovers(tmp_path, "bundle") == []


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["full-disk", "interrupted"])
def test_failed_reexport_keeps_the_previous_bundle(bundle, checkpoint, tmp_path, monkeypatch, failure):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken_write(folder, manifest):  # dies while writing the new manifest, after every artifact is in place
        (Path(folder) / MANIFEST_FILE).write_text('{"schema_version": 1, "trunc')
        raise failure

    monkeypatch.setattr(pipeline, "write_manifest", broken_write)
    with pytest.raises(type(failure)):
        run_export(checkpoint, out, quants=[], log=lambda _: None)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and _leftovers(tmp_path, "bundle") == []
    read_manifest(out, verify=True)


# ----------------------------------------------------------------------------------------------------------------
# With GGUF (export.gguf), and the real-size vision graph


def test_one_go_export_includes_gguf(checkpoint, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is needed to quantize and validate the GGUF")
    out = tmp_path / "bundle"
    manifest = run_export(checkpoint, out, quants=["q8_0"], vision_precisions=[], log=lambda _: None)
    gguf = manifest.find("llm_gguf", "q8_0")
    assert gguf is not None and gguf.validation and gguf.inputs_key
    assert (out / gguf.path).is_file() and read_manifest(out, verify=True).find("llm_gguf", "q8_0") == gguf
    print(f"GGUF q8_0 validation: {gguf.validation}")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SQLLAVA_EDGE_SLOW"),
                    reason="real-size export: ~4 min and ~6 GB RAM on 2 cores; run with SQLLAVA_EDGE_SLOW=1")
def test_real_size_vision_graph_exports_and_validates(tmp_path):
    """bench-1b (CLIP ViT-L/14-336 + the cluster projector to 2048), random weights, in a fresh process."""
    result = subprocess.run([sys.executable, "-m", "export.onnx", "--random-preset", "bench-1b", "--out", str(tmp_path / "b")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith("[")))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(tmp_path / "b", verify=True)
    assert manifest.find("vision_onnx", "fp32").validation["max_abs_diff"] <= 1e-4
    assert manifest.find("vision_onnx", "int8").validation["cosine_min"] >= 0.99
    assert "peak RSS" in result.stdout
