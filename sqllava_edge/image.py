"""The one image preprocessing every backend uses (docs/spec.md 1.3; edge-deployment.md 7.3). numpy + Pillow only, no torch.

`load_image(src)` turns anything image-like into an RGB `PIL.Image`:
  * sources: a path (str / PathLike), `bytes`, a binary file object, a `PIL.Image`, or a numpy array in channels-last
    layout (H, W), (H, W, 1), (H, W, 3) or (H, W, 4). Array dtypes: uint8 as is; bool -> 0/255; uint16 scaled to 8 bits;
    float must lie in [0, 1] and is scaled by 255 and rounded to the nearest integer.
  * transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited onto WHITE, the same as
    transformers' `convert_to_rgb`, so a transparent logo looks the same here as in the reference processor.
  * 16-bit grayscale (I;16*, I) is scaled to 8 bits (x * 255 / 65535, rounded), never clipped; 1-bit, L, P and CMYK
    use Pillow's conversion to RGB. ICC profiles are not applied (neither does the CLIP processor).
  * EXIF orientation is applied, for files and for PIL images alike.
  * animated / multi-frame files (GIF, APNG, WebP, multi-page TIFF): the FIRST frame is used and a `MultiFrameWarning`
    is issued. MPO (the multi-picture JPEG that phones write) uses its primary picture silently. A PIL image passed in
    is used at whatever frame it is on.
  * refused with `ImageError` (message says what to do): missing/empty files, non-images, formats outside
    `SUPPORTED_FORMATS` (e.g. EPS, which would run Ghostscript), truncated or corrupt data, and images larger than
    `max_pixels` (decompression-bomb guard, checked from the header before decoding; default 64 megapixels).
    Pillow's own hard limit (2 * PIL.Image.MAX_IMAGE_PIXELS) still applies above that.

`preprocess(src, vision, mode)` -> float32 (3, S, S): "pad" = pad to square with the mean colour then the CLIP processor
(the released SQ-LLaVA); "crop" = the CLIP processor alone (shortest edge -> S bicubic, centre crop); "resize" = stretch
to S x S bicubic. The numbers match transformers' PIL `CLIPImageProcessor` exactly (same sizes, rounding, dtypes).
"""
from __future__ import annotations

import io
import os
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sqllava_edge.config import ASPECT_MODES, VisionConfig
from sqllava_edge.errors import ImageError, ImageTooLargeError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: above any phone/DSLR photo, far below what would exhaust an 8 GB Jetson
# Largest side of an intermediate image: "pad" pads to max(W, H) square and "crop" scales the short side to S, so an
# extreme aspect ratio would make a canvas far larger than the image (64000x1000 -> 64000^2). Above this side the
# image is first scaled down (pad) or its centre cut out (crop), so no canvas exceeds CANVAS_SIDE^2 pixels; below it
# the numbers are the CLIP processor's exactly.
CANVAS_SIDE = 4096
SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "TGA", "ICO", "AVIF")
ALPHA_BACKGROUND = (255, 255, 255)  # transparency is composited onto white, as transformers' convert_to_rgb does
_MODES_16BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_FIX_FILE = "re-save or re-export it as PNG or JPEG"


class MultiFrameWarning(UserWarning):
    """An animated or multi-frame image was given; only its first frame is used."""


def load_image(src: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect: float | None = None) -> Image.Image:
    """Read `src` (see the module docstring) into a fresh RGB PIL image; raise ImageError for anything unusable.
    max_aspect: refuse images whose long side is more than this many times the short one (None: no limit)."""
    what = _describe(src)
    try:
        if isinstance(src, np.ndarray):
            return _from_array(src, max_pixels, what, max_aspect)
        if isinstance(src, Image.Image):
            _check_pixels(src.size, max_pixels, what, max_aspect)
            src.load()
            return _to_rgb(ImageOps.exif_transpose(src), fresh=True)  # exif_transpose returns a copy: src is kept
        with _open(src, what) as img:
            _check_pixels(img.size, max_pixels, what, max_aspect)
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format != "MPO":
                warnings.warn(f"{what} has {frames} frames; using the first. Extract the frame you want to silence "
                              "this.", MultiFrameWarning, stacklevel=2)
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img), fresh=True)
    except ImageError:
        raise
    except MemoryError as e:
        raise ImageTooLargeError(f"{what} needs more memory to decode than this machine has free; downscale it "
                                 "before passing it in") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{what} is too large for Pillow ({e}); downscale it before passing it in") from e
    except Exception as e:  # Pillow decoders raise OSError, SyntaxError, struct.error, ValueError...: never leak them
        raise ImageError(f"{what} could not be decoded ({type(e).__name__}: {e}); the data is corrupt or truncated: "
                         f"{_FIX_FILE}") from e


def pad_to_square(img: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """Pad to a square filled with `color`, original centred (docs/spec.md 1.3, `expand2square`): offset (0, (W-H)//2) when
    W > H, ((H-W)//2, 0) when H > W. A square image is returned unchanged."""
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    result = Image.new(img.mode, (side, side), color)
    result.paste(img, ((side - width) // 2, (side - height) // 2))  # one of the two offsets is 0
    return result


def pad_color(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """Background of "pad" mode: tuple(int(m*255) for m in image_mean) (docs/spec.md 1.3), (122, 116, 104) for CLIP."""
    return tuple(int(m * 255) for m in image_mean)  # type: ignore[return-value]


def preprocess(src: Any, vision: VisionConfig, mode: str = "pad", *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float | None = None) -> np.ndarray:
    """Load `src` and turn it into the vision tower's input: float32 (3, S, S) with S = vision.image_size."""
    if mode not in ASPECT_MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; use one of {', '.join(ASPECT_MODES)}")
    img = load_image(src, max_pixels=max_pixels, max_aspect=max_aspect)
    size = vision.image_size
    try:
        if mode == "resize":
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        else:
            if mode == "pad":
                img = pad_to_square(_fit_canvas(img, max(CANVAS_SIDE, size)), pad_color(vision.image_mean))
            img = _center_crop(_resize_shortest_edge(_crop_to_canvas(img, size), size), size)
    except MemoryError as e:
        raise ImageTooLargeError(f"{_describe(src)} needs more memory to resize than this machine has free; downscale "
                                 "it before passing it in") from e
    return _normalize(img, vision.image_mean, vision.image_std)


def _fit_canvas(img: Image.Image, side: int) -> Image.Image:
    """Scale down (bicubic, aspect kept) so the long side is at most `side`: what "pad" mode's square canvas needs."""
    width, height = img.size
    if max(width, height) <= side:
        return img
    scale = side / max(width, height)
    return img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


def _crop_to_canvas(img: Image.Image, size: int) -> Image.Image:
    """Cut the centre of a very long image before the shortest-edge resize, so the resized long side stays within
    CANVAS_SIDE; the centre crop that follows keeps only the middle anyway."""
    width, height = img.size
    short, long = min(width, height), max(width, height)
    if size * long / short <= CANVAS_SIDE:
        return img
    keep = max(short, int(short * CANVAS_SIDE / size))  # source pixels of the long side that map to CANVAS_SIDE
    if width > height:
        left = (width - keep) // 2
        return img.crop((left, 0, left + keep, height))
    top = (height - keep) // 2
    return img.crop((0, top, width, top + keep))


def preprocess_batch(srcs: Sequence[Any], vision: VisionConfig, mode: str = "pad", *,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """`preprocess` each source and stack them: float32 (B, 3, S, S). An ImageError names the failing index."""
    single = isinstance(srcs, (str, bytes, os.PathLike, Image.Image, np.ndarray))
    srcs = [] if single else list(srcs)
    if not srcs:
        raise ValueError("preprocess_batch needs a non-empty list of image sources; use preprocess for one image")
    out = []
    for i, src in enumerate(srcs):
        try:
            out.append(preprocess(src, vision, mode, max_pixels=max_pixels))
        except ImageError as e:
            raise ImageError(f"image {i} of the batch: {e}") from e
    return np.stack(out)  # (B, 3, S, S)


def _resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """CLIP processor resize: shortest edge -> size, long edge int(size * long / short) (truncated, as transformers'
    get_resize_output_image_size), bicubic."""
    width, height = img.size
    new_long = int(size * max(width, height) / min(width, height))
    new_size = (size, new_long) if width <= height else (new_long, size)  # PIL sizes are (W, H)
    return img.resize(new_size, Image.Resampling.BICUBIC)


def _center_crop(img: Image.Image, size: int) -> Image.Image:
    """CLIP processor centre crop: top = (H - size) // 2, left = (W - size) // 2 (floor, as transformers)."""
    width, height = img.size
    left, top = (width - size) // 2, (height - size) // 2
    return img.crop((left, top, left + size, top + size))


def _normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """docs/spec.md 1.3: rescale by 1/255 (in float64, then float32, as transformers' rescale), then (x - mean) / std in
    float32. Returns (3, S, S)."""
    x = (np.asarray(img, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # (S, S, 3)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (S, S, 3) -> (3, S, S)


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return f"image file {os.fspath(src)!r}"
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(src)} bytes)"
    if isinstance(src, np.ndarray):
        return f"image array of shape {src.shape} and dtype {src.dtype}"
    if isinstance(src, Image.Image):
        return f"PIL image ({src.mode} {src.size[0]}x{src.size[1]})"
    return f"image stream {getattr(src, 'name', type(src).__name__)!r}"


def _open(src: Any, what: str) -> Image.Image:
    """Open lazily (header only) from a path, bytes or a binary file object."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if isinstance(path, str) and path.startswith(("http://", "https://")):
            raise ImageError(f"{what} is a URL; download it first and pass the file path or its bytes")
        if not os.path.isfile(path):
            raise ImageError(f"no image file at {path!r}; check the path (it does not exist or is a folder)")
        fp: Any = path
    elif isinstance(src, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        fp = src if getattr(src, "seekable", lambda: False)() else io.BytesIO(src.read())
    else:
        raise ImageError(f"cannot read an image from {type(src).__name__!r}; pass a path, bytes, a binary file, a "
                         "PIL image or an HWC numpy array (for a torch tensor: t.permute(1, 2, 0).numpy())")
    if isinstance(fp, str) and os.path.getsize(fp) == 0 or isinstance(fp, io.BytesIO) and not fp.getbuffer().nbytes:
        raise ImageError(f"{what} is empty: the download or copy failed; fetch the image again")
    Image.init()  # register every plugin: with `formats` given, Pillow would otherwise know only the common five
    try:
        return Image.open(fp, formats=SUPPORTED_FORMATS)  # JPEG covers MPO
    except UnidentifiedImageError as e:
        raise ImageError(f"{what} is not an image in a supported format ({', '.join(SUPPORTED_FORMATS)}); "
                         f"check that it is the file you meant, or convert it to PNG or JPEG") from e


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str, max_aspect: float | None = None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} has no pixels ({width}x{height}); pass a non-empty image")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                         "(decompression-bomb guard); downscale it first, or pass a larger max_pixels if you trust it")
    if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
        raise ImageTooLargeError(f"{what} is {width}x{height}, an aspect ratio of {max(width, height) / min(width, height):.0f}:1, "
                                 f"over the limit of {max_aspect:g}:1 (max_aspect); crop it to the part that matters")


def _from_array(a: np.ndarray, max_pixels: int, what: str, max_aspect: float | None = None) -> Image.Image:
    """Channels-last numpy array -> RGB image (dtype rules in the module docstring)."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]  # (H, W, 1) -> (H, W)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageError(f"{what}: expected (H, W), (H, W, 3) or (H, W, 4) channels-last; for a channels-first "
                         "array pass arr.transpose(1, 2, 0)")
    _check_pixels((a.shape[1], a.shape[0]), max_pixels, what, max_aspect)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = np.rint(a * (255 / 65535)).astype(np.uint8)  # scale 16 -> 8 bits, not clip
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageError(f"{what}: float pixels must lie in [0, 1] (got {a.min()}..{a.max()}); divide 0-255 "
                             "data by 255 or pass it as uint8")
        a = np.rint(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"{what}: unsupported dtype; pass uint8 (0-255), uint16, bool, or float in [0, 1]")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)))


def _to_rgb(img: Image.Image, fresh: bool = False) -> Image.Image:
    """Any Pillow mode -> RGB (rules in the module docstring). Returns a new image, or `img` itself when it is RGB
    already and `fresh` (a copy nobody else holds: one full-size buffer fewer for a large image)."""
    if img.mode in _MODES_16BIT:
        a = np.asarray(img).astype(np.float64)  # (H, W); "I" is int32 holding 16-bit data
        img = Image.fromarray(np.rint(np.clip(a, 0, 65535) * (255 / 65535)).astype(np.uint8))  # scale, not clip
    elif img.mode == "F":
        return _from_array(np.asarray(img), 2**62, "float (mode F) image")  # size already checked by the caller
    bands = img.getbands()
    if "A" in bands or "a" in bands or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if fresh and img.mode == "RGB":
        return img
    return img.convert("RGB")
