"""`gen export --quantize int8`: a calibrated static int8 variant of a model's graphs, written beside the fp32 files
only when it is both faster and as good.

The variant is onnxruntime's static QDQ quantisation (onnxruntime.quantization.quantize_static): per-channel int8
weights, uint8 activations (the x86 kernels' fast U8S8 path, VNNI where the CPU has it) with ranges calibrated
(min-max) on the inputs the graph sees when it serves: the family's `calibration_batches`, e.g. a denoiser's inputs
along its own sampling trajectories. Only Conv is quantised: on the MNIST U-Net at batch 64, quantising MatMul and
Gemm as well was slower (the attention's Q/DQ pairs cost more than its int8 products save), and so were signed
activations.

Kept only when (1) the int8 graph runs at least `min_speedup` times as fast as the fp32 one at batch 64 on this
machine (timed side by side), and (2) `gen eval` of the version with the int8 variants stays within 1 point of class
accuracy and 15% of Frechet distance of fp32 at every sampling setting it scores (a student: each step count).
Otherwise the version is published without it and the log says what was measured. Serving picks the variant with
`gen serve --precision int8`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from serve.manifest import file_sha256
from trainer.models import Family

MIN_SPEEDUP = 1.8  # int8 / fp32 throughput at batch 64, below which the variant is not worth a second file
MAX_ACCURACY_DROP = 0.01  # class accuracy, absolute
MAX_FRECHET_RISE = 0.15  # Frechet distance, relative to fp32's
SPEED_BATCH = 64
CALIBRATION_SAMPLES = 64  # images sampled for calibration (a denoiser: one feed per U-Net call along each)
CALIBRATION_ROWS = 512  # at most this many rows of those feeds, chosen evenly


class QuantizeError(ValueError):
    """The model cannot be quantised as asked; the message says why."""


@dataclasses.dataclass
class Int8Result:
    why: str  # one line: what was measured and, if not written, which bar it missed
    entries: dict  # {graph: its manifest "int8" section, measurements included}; empty when not written


def require_int8_path(family: Family) -> None:
    """QuantizeError unless the family says what to calibrate on (Family.calibration_batches)."""
    if type(family).calibration_batches is Family.calibration_batches:
        raise QuantizeError(f"--quantize int8: {family.name} models have no int8 variant yet (diffusion models do)")


def quantize_graph(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> None:
    """Static QDQ int8 of `src` calibrated on `feeds`, written to `dst`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"  # shapes inferred and graph optimised: what the quantiser expects
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])


def calibration_feeds(batches: list[dict[str, np.ndarray]], rows: int = CALIBRATION_ROWS,
                      chunk: int = 64) -> list[dict[str, np.ndarray]]:
    """At most `rows` rows of `batches` (evenly spaced, so every step of a trajectory is represented), in feeds
    of `chunk` rows."""
    whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    total = len(next(iter(whole.values())))
    keep = np.linspace(0, total - 1, min(rows, total)).round().astype(int)
    return [{k: v[keep[i:i + chunk]] for k, v in whole.items()} for i in range(0, len(keep), chunk)]


def speedup(fp32: Path, int8: Path, feeds: dict[str, np.ndarray], rounds: int = 7) -> dict:
    """Median time of one run at the feeds' batch, fp32 and int8 in turn (the server's session options)."""
    import onnxruntime as ort

    from serve.session import session_options

    sessions = {p: ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
                for p, path in (("fp32", fp32), ("int8", int8))}
    times: dict[str, list[float]] = {p: [] for p in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(rounds):
        for p, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds)
            times[p].append(time.perf_counter() - t0)
    fp32_ms, int8_ms = (float(np.median(times[p])) * 1e3 for p in ("fp32", "int8"))
    return {"batch": len(next(iter(feeds.values()))), "fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3),
            "speedup": round(fp32_ms / int8_ms, 3)}


def quality(version_dir: Path, manifest: dict, n: int, log) -> list[dict]:
    """gen eval of the draft version at fp32 and at int8, setting by setting."""
    from trainer.evaluate import EvalConfig, evaluate_all

    rows = []
    with tempfile.TemporaryDirectory() as repo:  # the draft, seen as a repository of one version
        (Path(repo) / manifest["name"]).mkdir()
        os.symlink(version_dir.resolve(), Path(repo) / manifest["name"] / str(manifest["version"]))
        reports = {p: evaluate_all(repo, manifest["name"], EvalConfig(n=n, precision=p), log=lambda m: None)
                   for p in ("fp32", "int8")}
    for fp32, int8 in zip(reports["fp32"], reports["int8"]):
        row = {"sampling": fp32.details.get("sampling")}
        for p, report in (("fp32", fp32), ("int8", int8)):
            values = {m.name: m.value for m in report.metrics}
            row[p] = {"class_accuracy": values.get("class accuracy"), "frechet": values.get("frechet distance")}
        rows.append(row)
        log(f"  int8 quality {json.dumps(row)}")
    return rows


def quality_misses(rows: list[dict]) -> list[str]:
    """The bars the int8 rows miss, one phrase each."""
    misses = []
    for row in rows:
        at = row["sampling"] and f"{row['sampling']['sampler']} {row['sampling']['steps']} steps" or "its setting"
        a, b = row["fp32"], row["int8"]
        if a["class_accuracy"] is not None and b["class_accuracy"] < a["class_accuracy"] - MAX_ACCURACY_DROP:
            misses.append(f"class accuracy {b['class_accuracy']:.1%} vs fp32 {a['class_accuracy']:.1%} at {at}")
        if a["frechet"] is not None and b["frechet"] > a["frechet"] * (1 + MAX_FRECHET_RISE):
            misses.append(f"Frechet distance {b['frechet']:.4g} vs fp32 {a['frechet']:.4g} at {at}")
    return misses


def int8_variants(family: Family, graphs: dict, version_dir: Path, manifest: dict, min_speedup: float = MIN_SPEEDUP,
                  eval_n: int = 1000, log=lambda msg: None) -> Int8Result:
    """Quantise the draft version's graphs in place (`version_dir`, its fp32 files and `manifest` written), time
    and score them; the result's entries are the graphs' "int8" manifest sections, empty when a bar was missed."""
    import torch

    from trainer.export import example_inputs

    require_int8_path(family)
    batches = family.calibration_batches(CALIBRATION_SAMPLES, seed=0)
    entries, measured = {}, {}
    for gname, graph_batches in batches.items():
        src, dst = version_dir / manifest["graphs"][gname]["file"], version_dir / f"{gname}.int8.onnx"
        log(f"quantizing {gname} to int8 ({sum(len(next(iter(b.values()))) for b in graph_batches)} calibration "
            "rows available)")
        quantize_graph(src, dst, calibration_feeds(graph_batches))
        gen = torch.Generator().manual_seed(0)
        feeds = {k: a.numpy() for k, a in zip(graphs[gname].inputs,
                                               example_inputs(graphs[gname].inputs, SPEED_BATCH, gen))}
        measured[gname] = speedup(src, dst, feeds)
        log(f"  {gname}.int8: {measured[gname]['int8_ms']:.1f} ms vs fp32 {measured[gname]['fp32_ms']:.1f} ms at "
            f"batch {SPEED_BATCH}: x{measured[gname]['speedup']:.2f}")
        entries[gname] = {"file": dst.name, "sha256": file_sha256(dst), "bytes": dst.stat().st_size}

    def drop(why: str) -> Int8Result:
        for e in entries.values():
            (version_dir / e["file"]).unlink(missing_ok=True)
        return Int8Result(f"int8 variant not written: {why}", {})

    slow = {g: m["speedup"] for g, m in measured.items() if m["speedup"] < min_speedup}
    if slow:
        return drop(", ".join(f"{g} x{s:.2f} the fp32 speed at batch {SPEED_BATCH} (needs x{min_speedup:g})"
                              for g, s in slow.items()))
    draft = json.loads(json.dumps(manifest))
    for gname, e in entries.items():
        draft["graphs"][gname]["int8"] = e
    (version_dir / "manifest.json").write_text(json.dumps(draft, indent=2))
    rows = quality(version_dir, draft, eval_n, log)
    misses = quality_misses(rows)
    if misses:
        return drop("; ".join(misses) + f" (bars: {MAX_ACCURACY_DROP:.0%} accuracy, {MAX_FRECHET_RISE:.0%} Frechet)")
    for gname, e in entries.items():
        e["check"] = {**measured[gname], "eval_n": eval_n, "quality": rows}
    speeds = ", ".join(f"{g} x{m['speedup']:.2f}" for g, m in measured.items())
    return Int8Result(f"int8 variant written: {speeds} at batch {SPEED_BATCH}, gen eval within the bars", entries)
