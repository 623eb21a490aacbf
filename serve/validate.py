"""Request checks: every bad field is an InvalidArgument whose message names it and says what is allowed.

The runtime calls these before a request reaches a batcher or the denoising loop, so one bad request never
fails a batch it would have shared.
"""
from __future__ import annotations

import math
import secrets

import numpy as np

from serve.errors import InvalidArgument
from serve.families import DENOISE, FAMILIES
from serve.manifest import Manifest, TensorInfo

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
MAX_GUIDANCE = 50.0


def check_n(n, max_n: int) -> int:
    if not is_int(n) or not 1 <= n <= max_n:
        raise InvalidArgument(f"n: must be between 1 and {max_n}, got {n!r}")
    return int(n)

def check_rows(field_name: str, rows: int, max_n: int) -> None:
    if not 1 <= rows <= max_n:
        raise InvalidArgument(f"{field_name}: between 1 and {max_n} rows per request, got {rows}")

def images(value, manifest: Manifest, max_n: int, field_name: str = "images") -> np.ndarray:
    spec = manifest.image
    expected = (spec["channels"], spec["height"], spec["width"])
    try:
        x = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{field_name}: not an array ({e})") from None
    if x.ndim != 4 or x.shape[1:] != expected:
        raise InvalidArgument(f"{field_name}: expected float NCHW with (C, H, W) = {expected} "
                              f"({manifest.name} takes {spec['height']}x{spec['width']}, "
                              f"{spec['channels']} channel(s)), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidArgument(f"{field_name}: expected floats in [-1, 1], got {x.dtype}")
    check_rows(field_name, len(x), max_n)
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_finite(field_name, x)
    return x

def tensor(field_name: str, value, spec: TensorInfo, max_n: int) -> np.ndarray:
    """An input checked against its manifest TensorInfo: dtype kind, shape (-1 = any), rows, finite."""
    try:
        x = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{field_name}: not an array ({e})") from None
    want = NP_DTYPES[spec.dtype]
    kind_ok = np.issubdtype(x.dtype, np.floating) if np.issubdtype(want, np.floating) else \
        np.issubdtype(x.dtype, np.integer)
    if not kind_ok:
        raise InvalidArgument(f"{field_name}: expected {spec.dtype}, got {x.dtype}")
    shape = tuple(spec.shape)
    if shape == (-1,) and x.ndim == 2 and x.shape[1] == 1:  # a per-row scalar as Triton declares it: dims [1]
        x = x.reshape(-1)
    if x.ndim != len(shape) or any(s != -1 and s != d for s, d in zip(shape[1:], x.shape[1:])):
        raise InvalidArgument(f"{field_name}: expected shape {list(shape)} (-1 = any), got {list(x.shape)}")
    check_rows(field_name, len(x), max_n)
    x = np.ascontiguousarray(x, dtype=want)
    if np.issubdtype(want, np.floating):
        check_finite(field_name, x)
    return x


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_seed(seed) -> int:
    if seed is None:
        return secrets.randbits(63)
    if not is_int(seed) or not 0 <= seed < 2**64:
        raise InvalidArgument(f"seed: expected an integer in [0, 2^64), got {seed!r}")
    return int(seed)


def check_float(field_name: str, value, lo: float, hi: float) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidArgument(f"{field_name}: must be a finite number between {lo:g} and {hi:g}, got {value!r}")
    return float(value)


def check_finite(field_name: str, x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InvalidArgument(f"{field_name}: NaN or Inf at index {list(index)}")


NULL_LABEL = -1  # in a Generate request: the null class of a classifier-free-guidance model (an unconditional row)


def labels_for(labels, n: int, m: Manifest, null: bool = False) -> np.ndarray | None:
    """Labels for n rows: None -> i % K (conditional) or None (unconditional); one label -> all rows.
    With `null` (a denoising model, which was trained with the null class K), NULL_LABEL asks for K."""
    k = m.num_classes
    if labels is None:
        return np.arange(n, dtype=np.int64) % k if k else None
    if not k:
        raise InvalidArgument(f"labels: {m.name!r} is unconditional (no classes); leave labels out")
    if is_int(labels):
        values = [labels]
    elif isinstance(labels, np.ndarray):
        values = list(labels.reshape(-1))
    else:
        try:
            values = list(labels)
        except TypeError:
            raise InvalidArgument(f"labels: expected a list of class indices, got {labels!r}") from None
    if len(values) == 0:
        return np.arange(n, dtype=np.int64) % k
    if len(values) not in (1, n):
        raise InvalidArgument(f"labels: give none, one, or one per image ({n}), got {len(values)}")
    for i, v in enumerate(values):
        if not is_int(v) or not (0 <= v < k or (null and v == NULL_LABEL)):
            also = f" (or {NULL_LABEL}, the null class)" if null else ""
            raise InvalidArgument(f"labels[{i}]: must be a class index between 0 and {k - 1}{also}, got {v!r}")
    out = np.asarray(values, dtype=np.int64)
    if null:
        out = np.where(out == NULL_LABEL, k, out)
    return np.repeat(out, n) if len(out) == 1 else out


def check_domains(feeds: dict[str, np.ndarray], m: Manifest) -> None:
    """Integer inputs that index tables inside the graph: out of range would fail the whole batch."""
    k = m.num_classes
    limits = {}
    if "label" in feeds:
        # the diffusion graphs also take the null class K; an unconditional step graph ignores its label
        denoise = FAMILIES[m.family].task == DENOISE
        limits["label"] = (0, k) if denoise and m.null_class else (0, k - 1)
        if denoise and not k:
            limits["label"] = (0, 0)
    if FAMILIES[m.family].task == DENOISE:
        T = int(m.diffusion["num_train_timesteps"])
        # the legacy step graph's inputs, for models exported before the sampler registry
        limits.update(t=(0, T - 1), t_prev=(-1, T - 1), t_last=(-1, T - 1), sampler=(0, 2))
    for name, (lo, hi) in limits.items():
        # a continuous input (a flow's t in [0, 1]) indexes nothing: out of range it extrapolates, it cannot fail
        if name in feeds and len(feeds[name]) and np.issubdtype(feeds[name].dtype, np.integer):
            v = feeds[name]
            if v.min() < lo or v.max() > hi:
                bad = int(v[(v < lo) | (v > hi)][0])
                raise InvalidArgument(f"{name}: values must be between {lo} and {hi}, got {bad}")
