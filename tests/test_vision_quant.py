"""benchmarks.vision_quant: calibration folder handling, the static QDQ candidate on the tiny preset's vision graph.

The timing itself is not tested (nothing timed in unit tests); the builders and the argument errors are.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from benchmarks import vision_quant
from sqllava_edge.config import get_preset


def test_missing_calibration_folder_is_a_clear_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        vision_quant.main(["--preset", "tiny", "--calibration", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "calibration folder" in err and "does not exist" in err and "nowhere" in err


def test_calibration_folder_without_images_is_a_clear_usage_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image is no image
    with pytest.raises(SystemExit) as exit_info:
        vision_quant.main(["--preset", "tiny", "--calibration", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "holds no images" in capsys.readouterr().err


def test_calibration_images_from_a_folder_are_preprocessed(tmp_path):
    config = get_preset("tiny")
    for name in ("b.PNG", "a.jpg"):
        Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / name)
    (tmp_path / "readme.md").write_text("skipped")
    assert [p.name for p in vision_quant.calibration_files(tmp_path)] == ["a.jpg", "b.PNG"]
    images = vision_quant.calibration_images(config, tmp_path)
    assert images.shape == (2, 3, config.vision.image_size, config.vision.image_size) and images.dtype == np.float32


def test_synthetic_scenes_are_seeded_and_structured():
    a, b = vision_quant.synthetic_images(2, 64, seed=3), vision_quant.synthetic_images(2, 64, seed=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    pixels = np.asarray(a[0], dtype=np.float64)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 10  # not a flat image
    assert not np.array_equal(np.asarray(a[0]), np.asarray(vision_quant.synthetic_images(1, 64, seed=4)[0]))


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory):
    """(fp32 VisionGraph module, its exported fp32 ONNX) of the tiny preset with random weights."""
    from types import SimpleNamespace

    import torch

    from export.onnx import export_graph, vision_graph
    from sqllava_edge.model import VisionTower, build_projector

    config = get_preset("tiny")
    torch.manual_seed(0)
    graph = vision_graph(SimpleNamespace(config=config, vision=VisionTower(config.vision).eval(),
                                         projector=build_projector(config).eval()), "fp32")
    fp32 = tmp_path_factory.mktemp("tiny") / "vision" / "vision.fp32.onnx"
    export_graph(graph, fp32, config.vision.image_size)
    return graph, fp32


def _scenes(config) -> np.ndarray:
    from sqllava_edge.image import preprocess

    return np.stack([preprocess(img, config.vision, config.image_aspect_ratio)
                     for img in vision_quant.synthetic_images(2, config.vision.image_size, seed=1)])


def _op_count(path, op: str) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op)


@pytest.mark.parametrize("attention", [("scores",), ("scores", "values")])
def test_int8_attention_candidates_quantize_one_matmul_per_layer_and_agree(tiny_graph, tmp_path, attention):
    from export.onnx import int8_nodes, quantize_int8
    from export.onnx_validate import Reference, validate_vision_onnx

    graph, fp32 = tiny_graph
    config = get_preset("tiny")
    layers = config.vision.num_layers + config.vision.select_layer + 1  # the tower stops at the selected layer
    weights_only, chosen = int8_nodes(fp32), int8_nodes(fp32, attention)
    assert len(chosen) - len(weights_only) == layers * len(attention) and set(weights_only) < set(chosen)
    out = tmp_path / "vision.int8.onnx"
    quantize_int8(fp32, out, attention, fuse_attention=False)
    assert _op_count(out, "MatMulInteger") == len(chosen) - 2  # every chosen node but the patch Conv and the Gather
    scenes = _scenes(config)
    report = validate_vision_onnx(out, "int8", [scenes], Reference(graph, [scenes]))  # raises below cosine 0.99
    assert report["cosine_min"] >= 0.99


def test_static_qdq_candidate_loads_and_agrees_on_scenes(tiny_graph, tmp_path):
    """The static candidate on the tiny graph: QDQ nodes, per-channel weight scales, per-token cosine >= 0.99 on
    scenes (compared as the export compares int8: with the graph's own prototype dispatch)."""
    import onnx

    from export.onnx_validate import Reference, validate_vision_onnx

    graph, fp32 = tiny_graph
    config = get_preset("tiny")
    out = tmp_path / "vision.int8-static.onnx"
    vision_quant.quantize_static_int8(fp32, out, vision_quant.calibration_images(config))
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    scales = {i.name: i for i in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in scales
                   and len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1]
    assert per_channel
    scenes = _scenes(config)
    report = validate_vision_onnx(out, "int8", [scenes], Reference(graph, [scenes]))  # raises below cosine 0.99
    print(f"static int8 on scenes: cosine min {report['cosine_min']:.4f} mean {report['cosine_mean']:.4f}")
    assert report["cosine_min"] >= 0.99


def test_fused_fp32_candidate_is_exact(tiny_graph, tmp_path):
    from export.onnx_validate import Reference, validate_vision_onnx

    graph, fp32 = tiny_graph
    out = tmp_path / "vision.fp32-fused.onnx"
    fused = vision_quant.fuse_graph(fp32, out)
    assert fused.get("QuickGelu", 0) > 0 and _op_count(out, "QuickGelu") == fused["QuickGelu"]
    scenes = _scenes(get_preset("tiny"))
    validate_vision_onnx(out, "fp32", [scenes], Reference(graph, [scenes]))  # raises beyond the fp32 tolerance 1e-4


@pytest.mark.parametrize("packed", [False, True])
def test_attention_rewrite_fuses_every_layer_and_is_exact(tiny_graph, tmp_path, packed):
    """export.onnx.attention on the tiny graph: one contrib op per tower layer, none of the exported attention left
    (no Softmax outside the prototype extractor), fp32 within the export's fp32 tolerance, and its int8 (QAttention
    when packed) within the int8 cosine floor."""
    import onnx

    from export.onnx import quantize_int8
    from export.onnx_validate import Reference, validate_vision_onnx

    graph, fp32 = tiny_graph
    config = get_preset("tiny")
    layers = config.vision.num_layers + config.vision.select_layer + 1
    softmax_before = _op_count(fp32, "Softmax")
    out = tmp_path / "vision.fp32-attention.onnx"
    vision_quant.rewrite_attention(fp32, out, packed=packed)
    op = "Attention" if packed else "MultiHeadAttention"
    assert _op_count(out, op) == layers and _op_count(out, "Softmax") == softmax_before - layers
    nodes = onnx.load(str(out), load_external_data=False).graph.node
    assert {n.domain for n in nodes if n.op_type == op} == {"com.microsoft"}
    if packed:
        assert _op_count(out, "MatMul") == _op_count(fp32, "MatMul") - 5 * layers  # Q, K, V and the two attention matmuls
    scenes = _scenes(config)
    reference = Reference(graph, [scenes])
    validate_vision_onnx(out, "fp32", [scenes], reference)  # raises beyond the fp32 tolerance 1e-4
    int8 = tmp_path / "vision.int8-attention.onnx"
    quantize_int8(out, int8)
    if packed:
        assert _op_count(int8, "QAttention") == layers and _op_count(int8, "Attention") == 0
    assert validate_vision_onnx(int8, "int8", [scenes], reference)["cosine_min"] >= 0.99


def test_attention_rewrite_leaves_other_patterns_alone():
    """A Softmax that is not the exported attention (no scaled matmul before it) is not rewritten."""
    import onnx
    from onnx import TensorProto, helper

    from export.onnx.attention import fuse_multihead, pack_qkv

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "xt"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    before = model.SerializeToString()
    assert fuse_multihead(model) == 0 and pack_qkv(model) == 0
    assert model.SerializeToString() == before
    onnx.checker.check_model(model)


def test_int8_export_fuses_attention_and_packs_qkv(tiny_graph, tmp_path):
    """export.onnx.quantize_int8 as the export runs it: per tower layer one MultiHeadAttention and one int8 matmul for
    Q, K and V together (no exported attention left), and per-token cosine >= 0.99 with the graph's own dispatch."""
    import onnx

    from export.onnx import quantize_int8
    from export.onnx_validate import Reference, validate_vision_onnx

    graph, fp32 = tiny_graph
    config = get_preset("tiny")
    layers = config.vision.num_layers + config.vision.select_layer + 1
    plain, fused = tmp_path / "vision.int8-plain.onnx", tmp_path / "vision.int8.onnx"
    quantize_int8(fp32, plain, fuse_attention=False)
    quantize_int8(fp32, fused)
    assert _op_count(fused, "MultiHeadAttention") == layers and _op_count(plain, "MultiHeadAttention") == 0
    assert _op_count(fused, "Softmax") == _op_count(fp32, "Softmax") - layers
    assert _op_count(fused, "MatMulInteger") == _op_count(plain, "MatMulInteger") - 2 * layers  # Q, K, V: one matmul
    assert _op_count(fused, "Split") == layers
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".fused-")]  # the fused fp32 copy is gone
    sizes = {tuple(i.dims) for i in onnx.load(str(fused)).graph.initializer if i.name.endswith(".qkv_weight_quantized")}
    assert sizes == {(config.vision.hidden_size, 3 * config.vision.hidden_size)}
    scenes = _scenes(config)
    report = validate_vision_onnx(fused, "int8", [scenes], Reference(graph, [scenes]))  # raises below cosine 0.99
    assert report["cosine_min"] >= 0.99


def test_quantized_attention_matmuls_need_the_unfused_graph(tiny_graph, tmp_path):
    from export.onnx import quantize_int8

    with pytest.raises(ValueError, match="fuse_attention=False"):
        quantize_int8(tiny_graph[1], tmp_path / "x.onnx", ("scores",))


def test_pack_qkv_rejects_an_unknown_target():
    from onnx import helper

    from export.onnx.attention import pack_qkv

    with pytest.raises(ValueError, match="MultiHeadAttention"):
        pack_qkv(helper.make_model(helper.make_graph([], "g", [], [])), into="QAttention")
