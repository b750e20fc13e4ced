"""Stage 0 (vision, training/pretrain_vision.py): per-patch targets come from the scene, the ViT learns them, and
the output is a CLIP folder that stage 1 accepts as --vision-base."""
import json

import pytest
import torch

from training.pretrain_vision import HEADS, patch_targets


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from training.synthetic import build

    out = tmp_path_factory.mktemp("synv") / "data"
    build(out, n_train=24, n_eval=4, seed=5, image_size=112, max_turns=2)
    return out


def test_patch_targets_label_object_patches_and_background():
    row = {"meta": {"objects": [{"colour": "green", "shape": "diamond", "size": "small", "x": 0.3125, "y": 0.0625,
                                 "r": 0.05}]}}
    t = patch_targets([row], 8)  # (1, 5, 64)
    assert t.shape == (1, len(HEADS), 64)
    assert t[0, :, 2].tolist() == [HEADS["colour"].index("green"), HEADS["shape"].index("diamond"),
                                   HEADS["size"].index("small"), HEADS["horizontal"].index("left"),
                                   HEADS["vertical"].index("top")]
    assert int((t[0, :3] > 0).sum()) == 3  # only patch 2 holds an object
    cols, rows = torch.arange(64) % 8, torch.arange(64) // 8
    assert torch.equal(t[0, 3], (cols >= 4).long()) and torch.equal(t[0, 4], (rows >= 4).long())
    with pytest.raises(ValueError, match="meta.objects"):
        patch_targets([{"id": "x"}], 8)


def test_vision_pretraining_learns_patches_and_feeds_stage1(synthetic_data, tmp_path):
    from transformers import CLIPVisionModel

    from training.pretrain_vision import main

    run = tmp_path / "v"
    folder = main(["--data", str(synthetic_data / "stage2.json"), "--eval-data", str(synthetic_data / "eval.json"),
                   "--out", str(run), "--max-steps", "40", "--batch-size", "8", "--threads", "1", "--no-progress"])
    info = json.loads((folder / "pretrain.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 40 and records[-1]["loss"] < 0.6 * records[0]["loss"]  # it learns
    assert set(info["held_out"]) == {"colour_acc", "shape_acc", "size_acc", "horizontal_acc", "vertical_acc",
                                    "background_acc"}
    assert info["held_out"]["background_acc"] > 0.9  # most patches are background: the easiest part, learnt first
    assert (run / "loss_curve.png").stat().st_size > 0
    from sqllava_edge.config import get_preset
    from sqllava_edge.model import VisionTower

    clip = CLIPVisionModel.from_pretrained(folder)
    torch.manual_seed(0)  # the trainer's init (--seed 0): the saved weights moved away from it
    start = VisionTower(get_preset("tiny").vision).clip
    assert not torch.allclose(clip.embeddings.patch_embedding.weight, start.embeddings.patch_embedding.weight)
    unused = get_preset("tiny").vision.layers_used  # layers past the selected one never run: saved as initialised
    assert torch.equal(clip.encoder.layers[unused].mlp.fc1.weight, start.encoder.layers[unused].mlp.fc1.weight)
    # stage 1 takes it as its frozen vision tower, referenced by the checkpoint
    from sqllava_edge.checkpoint import read_meta
    from training.train import TrainConfig, train

    ckpt = train(TrainConfig(stage=1, data=str(synthetic_data / "stage1.json"), out=str(tmp_path / "s1"),
                             vision_base=str(folder), batch_size=2, max_steps=1, threads=1, progress=False))
    assert str(folder.resolve()) in json.dumps(read_meta(ckpt))
    with pytest.raises(FileExistsError):
        main(["--data", str(synthetic_data / "stage2.json"), "--out", str(run), "--max-steps", "1", "--no-progress"])


def test_vision_pretraining_refuses_a_dataset_off_the_patch_grid(tmp_path):
    from training.pretrain_vision import main
    from training.synthetic import build

    build(tmp_path / "g4", n_train=3, n_eval=1, seed=1, max_turns=2, grid=4)
    with pytest.raises(ValueError, match="patch grid"):
        main(["--data", str(tmp_path / "g4" / "stage2.json"), "--out", str(tmp_path / "r"), "--max-steps", "1",
              "--no-progress"])


def test_gray_images_lose_their_hue_and_their_colour_targets(synthetic_data, tmp_path):
    """--gray-share: the chosen images become grey (equal R, G, B before normalization), the others stay as they
    are, and a run with it trains with the objects' colour ignored on the grey images."""
    from sqllava_edge.config import get_preset
    from training.pretrain_vision import load_split, main, to_gray

    vision = get_preset("tiny").vision
    pixels, _ = load_split(synthetic_data / "stage2.json", None, vision)
    which = torch.tensor([True, False] + [False] * (len(pixels) - 2))
    out = to_gray(pixels, which, vision)
    rgb = out * torch.tensor(vision.image_std).view(1, 3, 1, 1) + torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    assert torch.allclose(rgb[0, 0], rgb[0, 1], atol=1e-5) and torch.allclose(rgb[0, 1], rgb[0, 2], atol=1e-5)
    assert torch.equal(out[1:], pixels[1:]) and not torch.equal(out[0], pixels[0])
    run = tmp_path / "g"
    main(["--data", str(synthetic_data / "stage2.json"), "--out", str(run), "--max-steps", "3", "--batch-size", "8",
          "--gray-share", "0.5", "--threads", "1", "--no-progress"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["loss_colour"] > 0 for r in records)
