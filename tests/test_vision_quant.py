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


def test_static_qdq_candidate_loads_and_agrees_on_scenes(tmp_path):
    """The static candidate on the tiny graph: QDQ nodes, per-channel weight scales, per-token cosine >= 0.99 on
    scenes (compared as the export compares int8: with the graph's own prototype dispatch)."""
    from types import SimpleNamespace

    import onnx
    import torch

    from export.onnx import export_graph, vision_graph
    from export.onnx_validate import Reference, validate_vision_onnx
    from sqllava_edge.image import preprocess
    from sqllava_edge.model import VisionTower, build_projector

    config = get_preset("tiny")
    torch.manual_seed(0)
    graph = vision_graph(SimpleNamespace(config=config, vision=VisionTower(config.vision).eval(),
                                         projector=build_projector(config).eval()), "fp32")
    fp32, out = tmp_path / "vision" / "vision.fp32.onnx", tmp_path / "static" / "vision.int8-static.onnx"
    export_graph(graph, fp32, config.vision.image_size)
    out.parent.mkdir()
    vision_quant.quantize_static_int8(fp32, out, vision_quant.calibration_images(config))
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    scales = {i.name: i for i in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in scales
                   and len(scales[n.input[1]].dims) == 1 and scales[n.input[1]].dims[0] > 1]
    assert per_channel
    scenes = np.stack([preprocess(img, config.vision, config.image_aspect_ratio)
                       for img in vision_quant.synthetic_images(2, config.vision.image_size, seed=1)])
    report = validate_vision_onnx(out, "int8", [scenes], Reference(graph, [scenes]))  # raises below cosine 0.99
    print(f"static int8 on scenes: cosine min {report['cosine_min']:.4f} mean {report['cosine_mean']:.4f}")
    assert report["cosine_min"] >= 0.99
