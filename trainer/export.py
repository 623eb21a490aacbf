"""`gen export`: a trained run -> exported/<name>/<version>/, verified before it becomes visible.

Each graph is exported with the dynamo exporter (eval mode, dynamic batch axis, one self-contained
file), checked with onnx.checker, and run in onnxruntime against PyTorch at batch 1 and 7. Then the family's
own checks of the version as a whole (`Family.export_checks`: a denoising model drives the server's own loop over
its exported denoiser and compares it with the same sampler in PyTorch). Everything is written under a hidden
temporary folder that is renamed into place only when every check passed, so readers (the server, `gen models`)
never see half a version.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from serve.manifest import FORMAT, NAME_RE, file_sha256, next_version, parse_manifest
from trainer.loop import atomic_write, load_run
from trainer.models import ConfigError, ExportGraph, Family, TensorSpec

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 1e-2  # on the [-1, 1] image scale
PARITY_BATCHES = (1, 7)
DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """Verification failed; nothing was written."""


def example_inputs(specs: dict[str, TensorSpec], batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Random inputs inside each spec's range, batch axis set to `batch`."""
    out = []
    for spec in specs.values():
        shape = (batch, *spec.shape[1:])
        if spec.dtype == "int64":
            out.append(torch.randint(int(spec.low), int(spec.high), shape, generator=generator))
        else:
            out.append(torch.rand(shape, generator=generator) * (spec.high - spec.low) + spec.low)
    return out


def export_graph(graph: ExportGraph, path: Path, opset: int) -> None:
    """One graph -> one self-contained .onnx file with a dynamic batch axis on every input."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    args = tuple(example_inputs(graph.inputs, 2, torch.Generator().manual_seed(0)))
    module = graph.module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                    input_names=list(graph.inputs), output_names=list(graph.outputs),
                                    dynamic_shapes=tuple({0: batch} for _ in graph.inputs), verbose=False)
    program.save(str(path), external_data=False)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parity(graph: ExportGraph, path: Path, fp16: bool = False) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch per output, at each parity batch size."""
    session = _session(path)
    result = {}
    gen = torch.Generator().manual_seed(1234)
    for batch in PARITY_BATCHES:
        args = example_inputs(graph.inputs, batch, gen)
        with torch.no_grad():
            expected = graph.module(*args)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        feeds = {name: a.numpy().astype(np.float16) if fp16 and a.is_floating_point() else a.numpy()
                 for name, a in zip(graph.inputs, args)}
        got = session.run(list(graph.outputs), feeds)
        result[f"batch_{batch}"] = max(float(np.abs(g.astype(np.float32) - e.numpy()).max())
                                       for g, e in zip(got, expected))
    return result


def _fp16_variant(src: Path, dst: Path) -> None:
    """Half-precision weights and activations, float32 inputs and outputs (keep_io_types)."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))


def _tensor_json(specs: dict[str, TensorSpec]) -> list[dict]:
    return [{"name": n, "dtype": s.dtype, "shape": list(s.shape)} for n, s in specs.items()]


def check_target(name: str, version: int | None, opset: int) -> None:
    """ConfigError naming the option when --name, --version or --opset cannot be written."""
    if not NAME_RE.fullmatch(name):
        raise ConfigError(f"--name {name!r}: use lower-case letters, digits, '.', '_' or '-' "
                          f"(pattern {NAME_RE.pattern})")
    if version is not None and version < 1:
        raise ConfigError(f"--version {version}: versions are positive integers")
    if not 17 <= opset <= 21:
        raise ConfigError(f"--opset {opset}: use an opset from 17 to 21")


def export_model(run_dir: str | Path, name: str, repo: str | Path = "exported", version: int | None = None,
                 opset: int = DEFAULT_OPSET, fp16: bool = False, max_batch_size: int = 64,
                 quantize: str | None = None, int8_min_speedup: float | None = None, int8_eval_n: int = 1000,
                 log=lambda msg: None) -> Path:
    """Export, verify and publish a run as exported/<name>/<version>/; returns the version folder.

    quantize="int8": also an int8 variant of the graphs, kept only where it passes trainer/quantize.py's bars."""
    from trainer.quantize import MIN_SPEEDUP, int8_variants, require_int8_path

    check_target(name, version, opset)
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize {quantize}: use int8")
    family, dataset, record = load_run(run_dir)
    if quantize:
        require_int8_path(family)  # before anything is exported
    graphs = family.export_graphs()

    def manifest(version: int, graphs: dict, model_parity: dict) -> dict:
        return _manifest(family, dataset, record, name, version, opset, graphs, model_parity, max_batch_size)

    def int8(version_dir: Path, draft: dict) -> dict:
        result = int8_variants(family, graphs, version_dir, draft, MIN_SPEEDUP if int8_min_speedup is None
                               else int8_min_speedup, int8_eval_n, log)
        log(result.why)
        for gname, entry in result.entries.items():
            draft["graphs"][gname]["int8"] = entry
        return draft

    return publish(graphs, manifest, family.export_checks, name, repo, version, opset, fp16, log,
                   variants=int8 if quantize else None)


def publish(graphs: dict[str, ExportGraph], manifest_of: Callable[[int, dict, dict], dict],
            checks: Callable[[Path, dict], dict], name: str, repo: str | Path = "exported",
            version: int | None = None, opset: int = DEFAULT_OPSET, fp16: bool = False,
            log=lambda msg: None, variants: Callable[[Path, dict], dict] | None = None) -> Path:
    """Export `graphs`, verify them and publish REPO/NAME/VERSION/ (the next free version when None).

    `manifest_of(version, graphs_json, parity)` writes the manifest; `checks(version_dir, draft_manifest)` are the
    model's own checks of the version as a whole ({name: {max_abs, tolerance, what}}). Everything is written under
    a hidden temporary folder renamed into place only when every check passed.
    """
    model_dir = Path(repo) / name
    version = version or next_version(model_dir)
    final = model_dir / str(version)
    if final.exists():
        raise ConfigError(f"--version {version}: {final} exists already; omit --version for the next one")
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        graphs_json, model_parity = {}, {}
        for gname, graph in graphs.items():
            path = tmp / f"{gname}.onnx"
            log(f"exporting {gname}")
            export_graph(graph, path, opset)
            _check(path)
            result = parity(graph, path)
            worst = max(result.values())
            log(f"  {gname}: onnx.checker ok, max abs diff vs PyTorch {worst:.2e} (batch 1 and 7)")
            if worst > FP32_TOLERANCE:
                raise ExportError(f"graph {gname}: onnxruntime differs from PyTorch by {worst:.3g} "
                                  f"(tolerance {FP32_TOLERANCE}); nothing was written")
            entry = {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
                     "inputs": _tensor_json(graph.inputs), "outputs": _tensor_json(graph.outputs),
                     "parity": {**result, "tolerance": FP32_TOLERANCE}}
            if fp16:
                half = tmp / f"{gname}.fp16.onnx"
                _fp16_variant(path, half)
                result16 = parity(graph, half, fp16=False)
                worst16 = max(result16.values())
                log(f"  {gname}.fp16: max abs diff vs PyTorch fp32 {worst16:.2e}")
                if worst16 > FP16_TOLERANCE:
                    raise ExportError(f"graph {gname} fp16: differs from PyTorch by {worst16:.3g} "
                                      f"(tolerance {FP16_TOLERANCE}); nothing was written")
                entry["fp16"] = {"file": half.name, "sha256": file_sha256(half), "bytes": half.stat().st_size,
                                 "parity": {**result16, "tolerance": FP16_TOLERANCE}}
            graphs_json[gname] = entry
        # the model's checks of the version as a whole (a denoiser: the served loop against PyTorch)
        for check, result in checks(tmp, manifest_of(version, graphs_json, {})).items():
            err, tolerance = result["max_abs"], result["tolerance"]
            log(f"  {check}: {result.get('what', check)} vs PyTorch: max abs diff {err:.2e}")
            if err > tolerance:
                raise ExportError(f"{check}: {result.get('what', check)} differs from PyTorch by {err:.3g} "
                                  f"(tolerance {tolerance}); nothing was written")
            model_parity[check] = {"max_abs": err, "tolerance": tolerance}
        manifest = manifest_of(version, graphs_json, model_parity)
        parse_manifest(manifest)  # the server's own schema check, before anything is published
        if variants is not None:  # measured on the draft version (int8: gen eval serves it), so it needs its manifest
            atomic_write(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=2).encode()))
            manifest = variants(tmp, manifest)
            parse_manifest(manifest)
        atomic_write(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        os.replace(tmp, final)  # the publish step: one rename
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(model_dir.iterdir()):
            model_dir.rmdir()  # a failed first version leaves no empty model folder behind
    return final


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name}: onnx.checker refused the graph: {str(e).splitlines()[0]}") from None


def _manifest(family: Family, dataset, record: dict, name: str, version: int, opset: int, graphs: dict,
              model_parity: dict, max_batch_size: int) -> dict:
    info = family.info
    manifest = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "family": family.name,
        "task": family.spec().task,
        "opset": opset,
        "graphs": graphs,
        "image": {"channels": info.channels, "height": info.size, "width": info.size, "range": [-1.0, 1.0],
                  "to_uint8": "round((x + 1) * 127.5), clipped to [0, 255]"},
        "classes": list(info.class_names),
        "serving": {"max_batch_size": max_batch_size, "max_queue_delay_ms": 2},
        "config": dataclasses.asdict(family.config),
        "provenance": {
            "dataset": dataset.source,
            "steps": record["step"],
            "seed": record["train"]["seed"],
            "git_commit": record.get("git_commit"),
            "torch": record.get("torch"),
            "trained_with": {k: record["train"][k] for k in ("image_size", "batch_size", "lr", "direction")},
            "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "parity": model_parity,
    }
    manifest.update(family.manifest_sections())
    return manifest
