"""sqllava_edge.image: numbers equal transformers' CLIPImageProcessor; odd and bad images give the documented result."""
from __future__ import annotations

import functools
import io
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from sqllava_edge.config import CLIP_MEAN, VisionConfig
from sqllava_edge.errors import ImageError
from sqllava_edge.image import (
    MultiFrameWarning,
    load_image,
    pad_color,
    pad_to_square,
    preprocess,
    preprocess_batch,
)

SIZES = [(500, 300), (300, 500), (336, 336), (1, 5), (5, 1), (333, 101), (640, 480), (97, 1000)]  # (W, H)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + 1000 * width + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@functools.lru_cache(maxsize=None)
def _clip_processor(size: int, crop: bool = True):
    """transformers' CLIP processor with our VisionConfig numbers. The released SQ-LLaVA used the slow PIL processor;
    without torchvision `CLIPImageProcessor` falls back to it, and if torchvision appears we ask for it by name."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    vision = VisionConfig(image_size=size)
    kwargs = dict(image_mean=list(vision.image_mean), image_std=list(vision.image_std), do_convert_rgb=True)
    if crop:
        kwargs.update(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    else:  # "resize" mode: a plain S x S stretch
        kwargs.update(size={"height": size, "width": size}, do_center_crop=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision; falling back to CLIPImageProcessorPil"
        processor = CLIPImageProcessor(**kwargs)
        if processor.backend != "pil":
            processor = CLIPImageProcessorPil(**kwargs)
    return processor


def _reference(img: Image.Image, size: int, crop: bool = True) -> np.ndarray:
    return np.asarray(_clip_processor(size, crop)(images=img, return_tensors="np")["pixel_values"][0])


def _expand2square(img: Image.Image, color) -> Image.Image:
    """docs/spec.md 1.3, written out independently of the module under test."""
    width, height = img.size
    if width > height:
        out = Image.new("RGB", (width, width), color)
        out.paste(img, (0, (width - height) // 2))
        return out
    if height > width:
        out = Image.new("RGB", (height, height), color)
        out.paste(img, ((height - width) // 2, 0))
        return out
    return img


@pytest.mark.parametrize("size", [336, 112])
@pytest.mark.parametrize("width,height", SIZES)
def test_pad_mode_matches_pad_then_clip_processor(width, height, size):
    img = _noise(width, height)
    ours = preprocess(img, VisionConfig(image_size=size), mode="pad")
    ref = _reference(_expand2square(img, (122, 116, 104)), size)
    assert ours.shape == ref.shape == (3, size, size) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-5


@pytest.mark.parametrize("size", [336, 112])
@pytest.mark.parametrize("width,height", SIZES)
def test_crop_mode_matches_clip_processor(width, height, size):
    img = _noise(width, height, seed=1)
    ours = preprocess(img, VisionConfig(image_size=size), mode="crop")
    assert np.abs(ours - _reference(img, size)).max() <= 1e-5


@pytest.mark.parametrize("width,height", [(500, 300), (5, 1), (112, 112)])
def test_resize_mode_matches_processor_stretch(width, height):
    img = _noise(width, height, seed=2)
    ours = preprocess(img, VisionConfig(image_size=112), mode="resize")
    assert np.abs(ours - _reference(img, 112, crop=False)).max() <= 1e-5


def test_pad_colour_and_placement():
    assert pad_color(CLIP_MEAN) == (122, 116, 104)
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    square = np.asarray(pad_to_square(img, (1, 2, 3)))
    assert square.shape == (4, 4, 3)
    assert (square[1:3] == (255, 0, 0)).all() and (square[0] == (1, 2, 3)).all() and (square[3] == (1, 2, 3)).all()
    tall = np.asarray(pad_to_square(Image.new("RGB", (1, 4), (0, 255, 0)), (9, 9, 9)))
    assert (tall[:, 1] == (0, 255, 0)).all() and (tall[:, [0, 2, 3]] == 9).all()  # offset (4-1)//2 = 1
    # The padded band of a wide image is exactly the normalised mean colour after the whole pipeline.
    vision = VisionConfig(image_size=112)
    out = preprocess(Image.new("RGB", (200, 50), (255, 255, 255)), vision, mode="pad")
    band = (np.array([122, 116, 104], np.float64) / 255 - np.array(vision.image_mean)) / np.array(vision.image_std)
    assert np.abs(out[:, 0, :] - band[:, None]).max() < 1e-5
    white = (1 - np.array(vision.image_mean)) / np.array(vision.image_std)
    assert np.abs(out[:, 56, :] - white[:, None]).max() < 1e-5


def test_every_source_type_gives_the_same_tensor(tmp_path):
    img = _noise(60, 40, seed=3)
    path = tmp_path / "a.png"
    img.save(path)
    arr = np.asarray(img)

    class NoSeek(io.RawIOBase):  # a pipe-like stream
        def __init__(self, data):
            self._buf = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            return self._buf.readinto(b)

    sources = [img, path, str(path), path.read_bytes(), open(path, "rb"), NoSeek(path.read_bytes()), arr,
               arr.astype(np.float32) / 255, arr.astype(np.uint16) * 257,
               np.concatenate([arr, np.full_like(arr[..., :1], 255)], -1)]  # opaque RGBA
    vision = VisionConfig(image_size=112)
    expected = preprocess(img, vision)
    for src in sources:
        np.testing.assert_array_equal(preprocess(src, vision), expected, err_msg=type(src).__name__)
    sources[4].close()


def test_batch_and_argument_errors():
    vision = VisionConfig(image_size=112)
    imgs = [_noise(30, 20), _noise(20, 30)]
    batch = preprocess_batch(imgs, vision, "crop")
    assert batch.shape == (2, 3, 112, 112) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(imgs[1], vision, "crop"))
    with pytest.raises(ImageError, match="image 1 of the batch"):
        preprocess_batch([imgs[0], b"not an image"], vision)
    with pytest.raises(ValueError, match="non-empty list"):
        preprocess_batch([], vision)
    with pytest.raises(ValueError, match="non-empty list"):
        preprocess_batch("a.png", vision)
    with pytest.raises(ValueError, match="pad, crop, resize"):
        preprocess(imgs[0], vision, mode="square")


def test_caller_image_is_not_modified():
    img = Image.new("RGBA", (30, 10), (255, 0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6
    img.info["exif"] = exif.tobytes()
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (10, 30)
    assert img.mode == "RGBA" and img.size == (30, 10) and img.getexif()[0x0112] == 6


def test_module_does_not_import_torch():
    code = "import sys, sqllava_edge.image; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the table of bad and odd images
def _save(tmp_path, name, img, **kwargs):
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def _write(tmp_path, name, data: bytes):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds no pixel data: a decompression bomb costs nothing to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    _noise(64, 64).save(buf, "JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return tmp_path / "t.jpg"


def _corrupt_png(tmp_path):
    data = bytearray(_save(tmp_path, "c.png", _noise(32, 32)).read_bytes())
    start = data.index(b"IDAT") + 20
    data[start:start + 40] = bytes(40)  # zeroed compressed data: CRC and zlib stream both break
    (tmp_path / "c.png").write_bytes(bytes(data))
    return tmp_path / "c.png"


def _animated_gif(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return _save(tmp_path, "a.gif", frames[0], save_all=True, append_images=frames[1:], duration=100)


def _exif_rotated_jpeg(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half ends up on top
    return _save(tmp_path, "r.jpg", img, exif=exif, quality=95)


def _sixteen_bit(tmp_path):
    values = np.array([[0, 257 * 100, 1000, 65535]], dtype=np.uint16).repeat(3, axis=0)
    return _save(tmp_path, "g16.png", Image.fromarray(values))


def _palette_transparent(tmp_path):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (2, 0, 4, 2))  # right half index 1 = red; left half index 0 = transparent black
    return _save(tmp_path, "p.png", img, transparency=0)


def _rgba(tmp_path):
    a = np.zeros((2, 3, 4), np.uint8)
    a[:, 0] = (255, 0, 0, 255)  # opaque red
    a[:, 1] = (255, 0, 0, 0)  # fully transparent red -> white
    a[:, 2] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    return _save(tmp_path, "rgba.png", Image.fromarray(a))


def _pixels(img):
    return np.asarray(img).astype(int)


OK, ERR = "ok", "error"
# (name, build(tmp_path) -> source, load_image kwargs, expected, check or required message words)
CASES = [
    ("truncated jpeg", _truncated_jpeg, {}, ERR, ["truncated", "re-save"]),
    ("corrupt png", _corrupt_png, {}, ERR, ["corrupt", "re-save"]),
    ("0-byte file", lambda p: _write(p, "e.png", b""), {}, ERR, ["empty", "fetch the image again"]),
    ("empty bytes", lambda p: b"", {}, ERR, ["empty"]),
    ("text named .png", lambda p: _write(p, "x.png", b"hello"), {}, ERR,
     ["not an image", "convert it to PNG"]),
    ("eps (would run ghostscript)", lambda p: _write(p, "x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n"),
     {}, ERR, ["supported format"]),
    ("bomb over our limit", lambda p: _png_header(9000, 9000), {}, ERR, ["81,000,000 pixels", "limit of 64,000,000", "max_pixels"]),
    ("bomb over pillow's limit", lambda p: _png_header(30000, 30000), {"max_pixels": 10**12}, ERR, ["downscale"]),
    ("real image over a set limit", lambda p: _save(p, "big.png", _noise(100, 80)), {"max_pixels": 5000}, ERR,
     ["8,000 pixels", "limit of 5,000", "max_pixels"]),
    ("missing path", lambda p: p / "nope.jpg", {}, ERR, ["nope.jpg", "check the path"]),
    ("a folder", lambda p: p, {}, ERR, ["check the path"]),
    ("url", lambda p: "https://example.com/cat.jpg", {}, ERR, ["download it first"]),
    ("unsupported type", lambda p: 42, {}, ERR, ["pass a path"]),
    ("channels-first array", lambda p: np.zeros((3, 8, 9), np.uint8), {}, ERR, ["transpose(1, 2, 0)"]),
    ("float array out of range", lambda p: np.full((4, 4, 3), 200.0), {}, ERR, ["[0, 1]", "divide"]),
    ("int64 array", lambda p: np.zeros((4, 4), np.int64), {}, ERR, ["pass uint8"]),
    ("empty array", lambda p: np.zeros((0, 5, 3), np.uint8), {}, ERR, ["no pixels"]),
    ("animated gif: first frame + warning", _animated_gif, {}, OK,
     lambda im: im.size == (8, 6) and (_pixels(im) == (255, 0, 0)).all()),
    ("cmyk jpeg", lambda p: _save(p, "c.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=100), {}, OK,
     lambda im: im.mode == "RGB" and np.abs(_pixels(im) - (255, 0, 0)).max() <= 3),
    ("16-bit png: scaled, not clipped", _sixteen_bit, {}, OK,
     lambda im: (_pixels(im)[0, :, 0] == (0, 100, 4, 255)).all()
     and (_pixels(im)[..., 0] == _pixels(im)[..., 2]).all()),
    ("rgba png onto white", _rgba, {}, OK,
     lambda im: (_pixels(im)[:, 0] == (255, 0, 0)).all() and (_pixels(im)[:, 1] == 255).all()
     and (np.abs(_pixels(im)[:, 2] - 127) <= 1).all()),
    ("LA png onto white", lambda p: _save(p, "la.png", Image.new("LA", (3, 3), (0, 0))), {}, OK,
     lambda im: (_pixels(im) == 255).all()),
    ("palette png with transparency", _palette_transparent, {}, OK,
     lambda im: (_pixels(im)[:, :2] == 255).all() and (_pixels(im)[:, 2:] == (255, 0, 0)).all()),
    ("1-bit image", lambda p: _save(p, "b.png", Image.fromarray(np.eye(4, dtype=bool))), {}, OK,
     lambda im: (_pixels(im)[..., 1] == np.eye(4) * 255).all()),
    ("grayscale png", lambda p: _save(p, "g.png", Image.new("L", (5, 7), 77)), {}, OK,
     lambda im: im.size == (5, 7) and (_pixels(im) == 77).all()),
    ("exif-rotated jpeg", _exif_rotated_jpeg, {}, OK,
     lambda im: im.size == (20, 40) and np.abs(_pixels(im)[5, 10] - (255, 0, 0)).max() < 30
     and np.abs(_pixels(im)[35, 10] - (0, 0, 255)).max() < 30),
]


@pytest.mark.parametrize("name,build,kwargs,expected,check", CASES, ids=[c[0] for c in CASES])
def test_bad_and_odd_images(tmp_path, name, build, kwargs, expected, check):
    src = build(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if expected == ERR:
            with pytest.raises(ImageError) as info:  # any other exception type fails the test
                load_image(src, **kwargs)
            for words in check:
                assert words in str(info.value), f"{words!r} not in {info.value}"
            return
        img = load_image(src, **kwargs)
        pixels = preprocess(src, VisionConfig(image_size=28, patch_size=14), "pad")
    assert img.mode == "RGB" and pixels.shape == (3, 28, 28) and np.isfinite(pixels).all()
    assert check(img), f"unexpected pixels {np.asarray(img)[:2, :4].tolist()}"
    multi = [w for w in caught if issubclass(w.category, MultiFrameWarning)]
    assert len(multi) == (2 if name.startswith("animated") else 0)  # one per call
