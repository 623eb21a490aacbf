"""`gen import GRAPH.onnx --name NAME`: a plain ONNX graph -> exported/<name>/<version>/, served over OIP.

The graph becomes a version of the imported family (serve/families.py, `imported`): one graph, `model`, so the
OIP model is "<name>.model" like every other graph "<model>.<graph>". Its inputs and outputs (names, dtypes,
shapes) are read from the graph as onnxruntime opens it. The batch axis is detected: when every input and output
has a dynamic (symbolic or unknown) first dimension the graph is batched (manifest shapes start with -1, the server
merges requests up to serving.max_batch_size); otherwise, or with `batch=False`, it is unbatched: serving.max_batch_size
0 as in Triton, the shapes are the whole tensors' and every request runs on its own.

The check before anything is published: onnx.checker (full_check, which runs strict shape inference) and one
onnxruntime run on random inputs of the declared dtypes and shapes (batch 2 when batched, every other dynamic
dimension 1: what the server's warm-up runs too), whose outputs must have the declared ranks and, when batched, the
batch's rows. As `gen export` does, the version is written under a hidden temporary folder beside it and renamed into
place only when the manifest passed the server's own schema check; a failure leaves nothing behind.

No torch: this needs only the `serve` extra (onnx, onnxruntime, numpy).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path

import numpy as np

from serve.families import IMPORTED
from serve.manifest import DTYPES, FORMAT, NAME_RE, TensorInfo, file_sha256, next_version, parse_manifest

DEFAULT_MAX_BATCH_SIZE = 64
CHECK_BATCH = 2  # the check run's batch size: a batched graph must give as many rows back
# onnxruntime's type strings of the dtypes the server takes (serve/manifest.py DTYPES)
ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
assert set(ORT_DTYPES.values()) == set(DTYPES)


class GraphImportError(ValueError):
    """The graph cannot be imported; the message says why and what to do. Nothing was written."""


def _json(t: TensorInfo) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def import_graph(graph: str | Path, name: str, repo: str | Path = "exported", version: int | None = None,
                 batch: bool | None = None, max_batch_size: int | None = None, log=lambda msg: None) -> Path:
    """Check and publish an ONNX file as REPO/NAME/VERSION/ (model.onnx + manifest.json); returns that folder.

    batch: None detects the batch axis, False serves the graph unbatched, True insists on a batch axis (an error
    when the graph has none). max_batch_size: the serving default of a batched graph (default 64).
    """
    graph = Path(graph)
    if not NAME_RE.fullmatch(name):
        raise GraphImportError(f"--name {name!r}: use lower-case letters, digits, '.', '_' or '-' "
                               f"(pattern {NAME_RE.pattern})")
    if version is not None and version < 1:
        raise GraphImportError(f"--version {version}: versions are positive integers")
    if max_batch_size is not None and max_batch_size < 1:
        raise GraphImportError(f"--max-batch-size {max_batch_size}: must be >= 1")
    if batch is False and max_batch_size is not None:
        raise GraphImportError("--max-batch-size: an unbatched graph (--no-batch) has none; leave one of them out")
    if not graph.is_file():
        raise GraphImportError(f"{graph}: no such file" if not graph.exists() else f"{graph}: not a file")
    model_dir = Path(repo) / name
    version = version or next_version(model_dir)
    final = model_dir / str(version)
    if final.exists():
        raise GraphImportError(f"--version {version}: {final} exists already; omit --version for the next one")

    created = [p for p in (Path(repo), model_dir) if not p.exists()]  # removed again if the import fails
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    published = False
    try:
        tmp.mkdir()
        (gname,) = IMPORTED.graphs
        path = tmp / f"{gname}.onnx"  # the manifest's graph entry is named after the file's stem
        _copy(graph, path)  # what is checked below is the file that gets published
        opset = _check(path, graph)
        inputs, outputs = _signature(path, graph)
        batched = _batched(inputs, outputs) if batch is not False else False
        if batch and not batched:
            raise GraphImportError(f"{graph.name}: has no batch axis (every input and output needs a dynamic first "
                                   f"dimension; {_fixed_first(inputs, outputs)}); leave out --batch to serve it "
                                   "unbatched")
        if not batched and max_batch_size is not None:
            raise GraphImportError(f"--max-batch-size: {graph.name} is not batched ({_fixed_first(inputs, outputs)}),"
                                   " so it is served unbatched; leave --max-batch-size out")
        scalars = [t.name for t in (*inputs, *outputs) if not t.shape]
        if scalars:
            raise GraphImportError(f"{graph.name}: {scalars[0]!r} is a scalar (rank 0); the server takes tensors of "
                                   "rank >= 1 (give it a dimension of 1, or a dynamic batch axis)")
        _run_once(path, graph, inputs, outputs, batched)
        mbs = (max_batch_size or DEFAULT_MAX_BATCH_SIZE) if batched else 0
        log(f"{graph.name}: onnx.checker ok (full check), one onnxruntime run ok"
            + (f" at batch {CHECK_BATCH}; batched, max batch size {mbs}" if batched else "; unbatched"))
        manifest = _manifest(graph, name, version, opset, path, inputs, outputs, mbs)
        parse_manifest(manifest)  # the server's own schema check, before anything is published
        with open(tmp / "manifest.json", "wb") as f:  # inside the hidden folder: the rename below publishes it
            f.write(json.dumps(manifest, indent=2).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # the publish step: one rename
        published = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not published:
            for folder in reversed(created):
                try:
                    folder.rmdir()  # only if still empty
                except OSError:
                    pass
    return final


def _copy(graph: Path, path: Path) -> None:
    """The graph as one self-contained file: copied byte for byte, or with its external data (weights in files
    beside it) embedded, as the repository keeps one file per graph."""
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and whatever else bytes that are no model raise
        raise GraphImportError(f"{graph}: not an ONNX model ({_first_line(e)})") from None
    try:
        whole = onnx.load(str(graph))  # with the external data read in, if it has any
        if whole.ByteSize() == model.ByteSize():  # it has none
            shutil.copyfile(graph, path)
            return
        onnx.save_model(whole, str(path))
    except Exception as e:  # noqa: BLE001 - a missing data file, or over protobuf's 2 GB
        raise GraphImportError(f"{graph.name}: its external data cannot be embedded in one file: "
                               f"{_first_line(e)}") from None


def _check(path: Path, graph: Path) -> int:
    """onnx.checker with full_check (strict shape inference) on the copy at `path` of the user's `graph`; returns
    its opset (of the default domain)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise GraphImportError(f"{graph.name}: onnx.checker refused the graph: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the checker's own failures on malformed files
        raise GraphImportError(f"{graph.name}: onnx.checker could not read it: {_first_line(e)}") from None
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not opsets:
        raise GraphImportError(f"{graph.name}: imports no opset of the default ONNX domain")
    return int(opsets[0])


def _session(path: Path, graph: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base class
        raise GraphImportError(f"{graph.name}: onnxruntime cannot open it: {_first_line(e)}") from None


def _signature(path: Path, graph: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The graph's inputs (initializers excluded) and outputs as onnxruntime, which serves it, opens them."""
    session = _session(path, graph)

    def tensors(args, kind: str) -> list[TensorInfo]:
        out = []
        for a in args:
            dtype = ORT_DTYPES.get(a.type)
            if dtype is None:
                what = a.type[len("tensor("):-1] if a.type.startswith("tensor(") else a.type  # e.g. double, seq(...)
                raise GraphImportError(f"{kind} {a.name!r} of {graph.name}: {what} is not served; the server takes "
                                       f"{', '.join(DTYPES)} tensors")
            if a.shape is None:
                raise GraphImportError(f"{kind} {a.name!r}: its rank is unknown; declare its shape in the graph")
            if any(isinstance(d, int) and d == 0 for d in a.shape):
                raise GraphImportError(f"{kind} {a.name!r}: shape {a.shape} has a dimension of 0")
            # a symbolic (str) or unknown (None) dimension is dynamic: -1
            out.append(TensorInfo(a.name, dtype, tuple(d if isinstance(d, int) and d > 0 else -1 for d in a.shape)))
        return out

    inputs, outputs = tensors(session.get_inputs(), "input"), tensors(session.get_outputs(), "output")
    if not inputs or not outputs:
        raise GraphImportError(f"{graph.name}: needs at least one input and one output")
    return inputs, outputs


def _batched(inputs: list[TensorInfo], outputs: list[TensorInfo]) -> bool:
    """Every input and output has a dynamic first dimension: the batch axis."""
    return all(len(t.shape) > 0 and t.shape[0] == -1 for t in (*inputs, *outputs))


def _fixed_first(inputs: list[TensorInfo], outputs: list[TensorInfo]) -> str:
    t = next(t for t in (*inputs, *outputs) if not t.shape or t.shape[0] != -1)
    return f"{t.name} has shape {list(t.shape)}"


def _run_once(path: Path, graph: Path, inputs: list[TensorInfo], outputs: list[TensorInfo], batched: bool) -> None:
    """One onnxruntime run on random inputs (floats normal; integers 0, a valid index into any table) at batch
    CHECK_BATCH, other dynamic dimensions 1; the outputs must have their declared shapes (-1 = any), and a batched
    graph's the batch's rows."""
    session = _session(path, graph)
    rng = np.random.default_rng(0)
    feeds = {}
    for t in inputs:
        shape = tuple(max(d, 1) for d in t.shape)
        if batched:
            shape = (CHECK_BATCH, *shape[1:])
        feeds[t.name] = np.zeros(shape, np.int64) if t.dtype == "int64" else \
            rng.standard_normal(shape).astype(t.dtype)
    try:
        results = session.run([t.name for t in outputs], feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common base class
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        raise GraphImportError(f"{graph.name}: the onnxruntime check run failed on inputs {shapes}: "
                               f"{_first_line(e)}") from None
    for t, r in zip(outputs, results):
        r = np.asarray(r)
        if r.ndim != len(t.shape) or any(s != -1 and s != d for s, d in zip(t.shape, r.shape)):
            raise GraphImportError(f"output {t.name!r}: the check run gave shape {list(r.shape)}, the graph "
                                   f"declares {list(t.shape)}")
        if batched and r.shape[0] != CHECK_BATCH:
            raise GraphImportError(f"output {t.name!r}: {r.shape[0]} rows for a batch of {CHECK_BATCH}, so its "
                                   "first dimension is not a batch axis; import it with --no-batch")


def _manifest(graph: Path, name: str, version: int, opset: int, path: Path, inputs: list[TensorInfo],
              outputs: list[TensorInfo], max_batch_size: int) -> dict:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "family": IMPORTED.name,
        "task": IMPORTED.task,
        "opset": opset,
        "graphs": {path.stem: {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size,
                               "inputs": [_json(t) for t in inputs], "outputs": [_json(t) for t in outputs]}},
        "classes": [],
        "serving": {"max_batch_size": max_batch_size, "max_queue_delay_ms": 2},  # 0: unbatched
        "provenance": {
            "imported_from": graph.name,
            "source_sha256": file_sha256(graph),
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "ir_version": model.ir_version,
            "checked": {"onnx_checker": "full_check", "onnx_version": onnx.__version__,
                        "onnxruntime_version": ort.__version__, "run_batch": CHECK_BATCH if max_batch_size else None},
            "imported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "parity": {},
    }


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
