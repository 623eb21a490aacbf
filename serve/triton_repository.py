"""Write the model repository in Triton Inference Server's layout: one Triton model per exported graph.

    OUT/<model>.<graph>/config.pbtxt          platform onnxruntime_onnx, batching from the manifest
    OUT/<model>.<graph>/<version>/model.onnx  the exported graph, byte for byte

Triton then serves each graph on its own; what `gen serve` adds on top (the diffusion loop, seeds, PNGs,
the task API) stays with the client: a diffusion image becomes one call per step. The latest healthy
version of every model is written (hashes verified); fp16 and int8 variants are not.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from protos import model_config_pb2 as mc
from serve.manifest import GraphInfo, Manifest, TensorInfo, scan_repository

DATA_TYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int64": mc.TYPE_INT64}


class TritonExportError(ValueError):
    """The repository cannot be written; the message says why and what to do."""


@dataclass(frozen=True)
class WrittenModel:
    name: str  # <model>.<graph>
    version: int
    path: Path  # the Triton model folder


def tensor_config(t: TensorInfo, message, batched: bool = True):
    """Triton lists shapes without the batch axis; a tensor that is only the batch axis ([B], e.g. a label
    per row) is declared [1] and reshaped to [] for the model, as Triton's documentation prescribes. An unbatched
    graph's (max_batch_size 0) dims are its whole shape."""
    message.name, message.data_type = t.name, DATA_TYPES[t.dtype]
    dims = list(t.shape[1:] if batched else t.shape)
    if dims:
        message.dims.extend(dims)
    else:
        message.dims.append(1)
        message.reshape.SetInParent()  # shape [] (no repeated values): present but empty
    return message


def model_config(manifest: Manifest, graph: GraphInfo) -> mc.ModelConfig:
    """The config.pbtxt message of one graph: inputs and outputs from the manifest, batching from its serving
    defaults (max_batch_size, max_queue_delay_ms; an unbatched graph: max_batch_size 0, no dynamic batching)."""
    config = mc.ModelConfig(name=f"{manifest.name}.{graph.name}", platform="onnxruntime_onnx",
                            max_batch_size=int(manifest.serving["max_batch_size"]))
    for t in graph.inputs:
        tensor_config(t, config.input.add(), manifest.batched)
    for t in graph.outputs:
        tensor_config(t, config.output.add(), manifest.batched)
    if not manifest.batched:
        return config
    delay_ms = float(manifest.serving.get("max_queue_delay_ms", 0))
    config.dynamic_batching.max_queue_delay_microseconds = int(round(delay_ms * 1000))
    return config


def write_triton_repository(repo: Path, out: Path) -> list[WrittenModel]:
    """Write every model's latest healthy version under `out`, which must not exist yet (or be empty).

    Built in a temporary folder beside `out` and renamed into place: a reader never sees half a repository.
    """
    repo, out = Path(repo), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TritonExportError(f"{out}: exists and is not an empty folder; remove it or choose a new one")
    latest: dict[str, object] = {}
    for entry in scan_repository(repo, verify=True):
        if entry.healthy:
            latest[entry.name] = entry  # scan order is ascending by version
    if not latest:
        raise TritonExportError(f"{repo}: no healthy models to write; export one with `gen export`")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the repository from a server running as another user
    written = []
    try:
        for _, entry in sorted(latest.items()):
            for graph in sorted(entry.manifest.served_graphs.values(), key=lambda g: g.name):
                config = model_config(entry.manifest, graph)
                folder = tmp / config.name
                (folder / str(entry.version)).mkdir(parents=True)
                shutil.copyfile(entry.path / graph.file, folder / str(entry.version) / "model.onnx")
                (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
                written.append(WrittenModel(config.name, entry.version, out / config.name))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return written
