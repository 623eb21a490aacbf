"""Images in and out: float [-1, 1] NCHW tensors <-> 8-bit pixels <-> PNG bytes, and sample grids.

The mapping is the manifest's `image.to_uint8`: round((x + 1) * 127.5), clipped to [0, 255] for the
range [-1, 1] (generally round((x - lo) / (hi - lo) * 255)); the inverse is x = u / 127.5 - 1.
Pillow decodes the inputs; anything it cannot read, or of the wrong size, is an InvalidArgument naming
the image by its index.
"""
from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, PngImagePlugin  # noqa: F401 - the PNG codec registered at import, not in the first request

from serve.errors import InvalidArgument

Image.preinit()  # what PIL does on the first save (about 4 ms): at import, so that no request pays for it

RANGE = (-1.0, 1.0)


def to_uint8(images: np.ndarray, value_range: Sequence[float] = RANGE) -> np.ndarray:
    """Float images (any layout) -> uint8 of the same shape: round((x - lo) / (hi - lo) * 255), clipped."""
    lo, hi = float(value_range[0]), float(value_range[1])
    x = (np.asarray(images, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(np.nan_to_num(x, nan=0.0)), 0, 255).astype(np.uint8)  # rint: half to even


def from_uint8(pixels: np.ndarray, value_range: Sequence[float] = RANGE) -> np.ndarray:
    """uint8 -> float32 in value_range (the inverse of to_uint8 on its grid)."""
    lo, hi = float(value_range[0]), float(value_range[1])
    return (np.asarray(pixels, dtype=np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)).astype(
        np.float32)


def _to_pil(chw_uint8: np.ndarray) -> Image.Image:
    c = chw_uint8.shape[0]
    if c == 1:
        return Image.fromarray(chw_uint8[0], mode="L")
    if c == 3:
        return Image.fromarray(np.ascontiguousarray(chw_uint8.transpose(1, 2, 0)), mode="RGB")
    raise InvalidArgument(f"images: expected 1 or 3 channels, got {c}")


def encode_png(image: np.ndarray, value_range: Sequence[float] = RANGE) -> bytes:
    """One float CHW image (1 channel: greyscale PNG, 3: RGB) -> PNG bytes."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise InvalidArgument(f"image: expected CHW, got shape {image.shape}")
    buf = io.BytesIO()
    _to_pil(to_uint8(image, value_range)).save(buf, format="PNG")
    return buf.getvalue()


def encode_pngs(images: np.ndarray, value_range: Sequence[float] = RANGE) -> list[bytes]:
    """Float NCHW images -> one PNG per image."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise InvalidArgument(f"images: expected NCHW, got shape {images.shape}")
    return [encode_png(im, value_range) for im in images]


def decode_image(data: bytes, channels: int, height: int, width: int, index: int = 0,
                 value_range: Sequence[float] = RANGE, resize: bool = False, field: str = "images") -> np.ndarray:
    """PNG/JPEG/... bytes -> float32 CHW with the model's channels (converted: grey <-> RGB, alpha dropped).

    A size other than height x width is an InvalidArgument unless `resize` (bilinear, no crop).
    """
    where = f"{field}[{index}]"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(bytes(data)))
            size = im.size  # read from the header, before any pixel is decoded
            if not resize and size != (width, height):
                raise InvalidArgument(f"{where}: expected {width}x{height} pixels, got {size[0]}x{size[1]}")
            im = im.convert("L" if channels == 1 else "RGB")
    except InvalidArgument:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidArgument(f"{where}: not a readable image ({type(e).__name__}: {e})") from None
    if resize and im.size != (width, height):
        im = im.resize((width, height), Image.BILINEAR)
    pixels = np.asarray(im, dtype=np.uint8)
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return from_uint8(pixels, value_range)


def decode_images(blobs: Sequence[bytes], channels: int, height: int, width: int,
                  value_range: Sequence[float] = RANGE, resize: bool = False, field: str = "images") -> np.ndarray:
    """A list of encoded images -> float32 NCHW; errors name `field`."""
    if not blobs:
        raise InvalidArgument(f"{field}: need at least one image")
    return np.stack([decode_image(b, channels, height, width, i, value_range, resize, field)
                     for i, b in enumerate(blobs)])


def decode_for(manifest, blobs: Sequence[bytes], resize: bool = False, field: str = "images") -> np.ndarray:
    """decode_images with the channels, size and range of a manifest's `image` spec."""
    spec = manifest.image
    return decode_images(blobs, spec["channels"], spec["height"], spec["width"], spec.get("range", RANGE), resize,
                         field)


def grid(images: np.ndarray, ncol: int | None = None, padding: int = 2, pad_value: float = -1.0) -> np.ndarray:
    """NCHW -> one CHW image of the same dtype: ncol columns (default about sqrt(N)), `padding` pixels between."""
    images = np.asarray(images)
    if images.ndim != 4 or not len(images):
        raise InvalidArgument(f"images: expected a non-empty NCHW array, got shape {images.shape}")
    n, c, h, w = images.shape
    ncol = max(1, min(n, ncol or math.ceil(math.sqrt(n))))
    nrow = math.ceil(n / ncol)
    out = np.full((c, nrow * (h + padding) + padding, ncol * (w + padding) + padding), pad_value, images.dtype)
    for i, im in enumerate(images):
        r, q = divmod(i, ncol)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        out[:, y:y + h, x:x + w] = im
    return out


def grid_png(images: np.ndarray, ncol: int | None = None, padding: int = 2,
             value_range: Sequence[float] = RANGE) -> bytes:
    """A PNG of `grid(images)`."""
    return encode_png(grid(images, ncol, padding, pad_value=float(value_range[0])), value_range)
