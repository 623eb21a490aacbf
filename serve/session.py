"""onnxruntime sessions, providers and IO binding: the one file that knows which device runs a graph.

Devices: "cpu", "cuda" or "cuda:N" (the CUDA execution provider on GPU N, with the fp16 graph file where the
manifest has one), or "auto" (CUDA when onnxruntime offers it, else the CPU). With the GPU wheel, a session's
`get_providers()` is the truth, not `get_available_providers()`: a missing CUDA or cuDNN library silently
gives a CPU-only session, which is refused when CUDA was asked for.

CPU sessions: intra-op threads = the cores this process may use, inter-op 1, every graph optimisation,
sequential execution.

Two kinds of runner:
  * `GraphRunner`: one exported graph, `run(feeds) -> outputs` on host arrays (the dynamic batcher's graphs).
  * `DenoisingSession`: a diffusion model's iteration graph (serve/denoising.py) with the sampler state of every
    resident row kept on the device between iterations. Step k's state output is bound as step k+1's state
    input (two buffers that alternate); per-iteration outputs go to buffers allocated once per batch-size
    bucket; only what the caller asks for (finished images, previews) is copied to the host. The CPU runs the
    same IO-binding code, so the suite covers it; `transfers` counts every image-sized copy either way.
    On CUDA, `cuda_graphs=True` captures one CUDA graph per (bucket, state buffer): rows are padded to the
    bucket, every input lives at a fixed device address refreshed with `update_inplace`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from serve.denoising import KNOWN, admit_model, iteration_model
from serve.errors import FailedPrecondition
from serve.families import FAMILIES
from serve.manifest import GraphInfo, Manifest

DEVICES = ("auto", "cpu", "cuda")  # plus "cuda:N"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def available_threads() -> int:
    """The cores this process may run on (the affinity mask, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_device(device: str) -> tuple[str, int]:
    """"auto" | "cpu" | "cuda" | "cuda:N" -> (kind, device id); ValueError naming the field."""
    kind, _, index = str(device).partition(":")
    if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"device: {device!r} is not one of auto, cpu, cuda, cuda:N")
    return kind, int(index or 0)


def session_options(threads: int | None = None, spin: bool = True) -> ort.SessionOptions:
    """The server's session options. spin=False: idle worker threads sleep instead of spinning, which gives
    the cores back to other processes (faster on a shared host, slower on one the server has to itself:
    BENCHMARKS.md, session options)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_threads()
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1  # sequential execution: the graphs are chains, nothing to overlap
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return options


def open_session(model: str | bytes, device: str = "auto", threads: int | None = None, spin: bool = True,
                 cuda_options: dict | None = None, name: str = "graph") -> tuple[ort.InferenceSession, str, int]:
    """An InferenceSession on the device asked for: (session, "cpu" | "cuda", device id)."""
    kind, device_id = parse_device(device)
    want_cuda = kind == "cuda" or (kind == "auto" and CUDA in ort.get_available_providers())
    if want_cuda:
        try:
            session = ort.InferenceSession(model, session_options(threads, spin),
                                           providers=[(CUDA, {"device_id": device_id, **(cuda_options or {})}), CPU])
        except Exception:
            if kind == "cuda":
                raise
            session = None  # auto: the CPU below
        providers = session.get_providers() if session is not None else []
        if CUDA in providers:
            return session, "cuda", device_id
        if kind == "cuda":
            raise FailedPrecondition(f"device={device!r}: onnxruntime could not use {CUDA} for {name} "
                                     f"(session providers: {providers}); check the CUDA and cuDNN "
                                     "libraries (onnxruntime.preload_dlls()) or use device='cpu'")
    return ort.InferenceSession(model, session_options(threads, spin), providers=[CPU]), "cpu", 0


class GraphRunner:
    """One graph file in one onnxruntime session: `run(feeds) -> {output name: array}`.

    On CUDA every run binds its inputs and outputs as OrtValues on the device (IO binding) and copies the
    outputs back once; the fp16 file is used there when the manifest has one (its inputs and outputs stay
    float32). Raises when the session cannot be created, CUDA was asked for and is not in the session's
    providers, or the graph's inputs/outputs are not the manifest's.
    """

    def __init__(self, version_dir: Path, graph: GraphInfo, device: str = "auto", threads: int | None = None,
                 fp16: bool | None = None, spin: bool = True, int8: bool = False):
        path = graph_path(version_dir, graph, device, fp16, int8)
        data = path.read_bytes()
        self.session, self.device, self.device_id = open_session(data, device, threads, spin, name=path.name)
        if self.device == "cpu" and path.name == graph.fp16_file:  # auto fell back to the CPU: the fp32 file there
            path = Path(version_dir) / graph.file
            data = path.read_bytes()
            self.session = ort.InferenceSession(data, session_options(threads, spin), providers=[CPU])
        self.file = path.name
        # the file's bytes, for whoever builds more from the same graph while the version loads (the iteration graph
        # around a denoiser): each file is read once; `take_source()` hands them over and forgets them
        self._source: bytes | None = data
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if sorted(inputs) != sorted(t.name for t in graph.inputs) or \
                sorted(outputs) != sorted(t.name for t in graph.outputs):
            raise ValueError(f"the graph's inputs {inputs} / outputs {outputs} are not the manifest's")
        self.graph = graph
        self.output_names = [t.name for t in graph.outputs]

    def take_source(self) -> tuple[str, bytes | None]:
        """(the file this runner opened, its bytes, once; None after the first call)."""
        data, self._source = self._source, None
        return self.file, data

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device == "cuda":
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(value), "cuda", self.device_id))
            for name in self.output_names:
                binding.bind_output(name, "cuda", self.device_id)
            self.session.run_with_iobinding(binding)
            outs = binding.copy_outputs_to_cpu()
        else:
            outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs))


@dataclass
class Transfers:
    """Image-sized copies between host and device made by a DenoisingSession (small per-row vectors excluded)."""

    uploads: int = 0  # x_T of admitted rows, noise
    downloads: int = 0  # finished images, previews

    def snapshot(self) -> Transfers:
        return Transfers(self.uploads, self.downloads)


def buckets(max_batch_size: int) -> list[int]:
    """Batch-size buckets for padded (CUDA-graph) runs: powers of two up to max_batch_size, and max_batch_size."""
    out, b = [], 1
    while b < max_batch_size:
        out.append(b)
        b *= 2
    return out + [max_batch_size]


class IterationOutput:
    """One iteration's per-row outputs, still on the device; `x()` / `x0()` copy them to the host (counted)."""

    def __init__(self, owner: DenoisingSession, x: ort.OrtValue, x0: ort.OrtValue, rows: int):
        self._owner, self._x, self._x0, self._rows = owner, x, x0, rows

    def x(self) -> np.ndarray:
        return self._owner._download(self._x, self._rows)

    def x0(self) -> np.ndarray:
        return self._owner._download(self._x0, self._rows)


def graph_path(version_dir: Path, graph: GraphInfo, device: str, fp16: bool | None, int8: bool = False) -> Path:
    """The file a session on `device` opens: the fp16 variant where CUDA may run it (unless fp16 is False), the
    int8 variant on the CPU when asked for (int8) and the manifest has one, else the fp32 file. A session that
    lands on the CPU anyway reopens the fp32 file."""
    kind, _ = parse_device(device)
    maybe_cuda = kind == "cuda" or (kind == "auto" and CUDA in ort.get_available_providers())
    if maybe_cuda:
        use = graph.fp16_file if graph.fp16_file is not None and fp16 is not False else None
    else:  # int8 QDQ graphs are a CPU variant: onnxruntime's x86 kernels run them (VNNI where the CPU has it)
        use = graph.int8_file if int8 else None
    return Path(version_dir) / (use or graph.file)


class DenoisingSession:
    """A diffusion model's denoising iteration with its rows' state resident on the device; see the module doc.

    `capacity` rows can be resident at once (slots 0..capacity-1); the caller admits rows into free slots and
    runs iterations over any subset of resident rows.
    """

    def __init__(self, version_dir: Path, manifest: Manifest, state_size: int, capacity: int,
                 device: str = "auto", threads: int | None = None, spin: bool = True, fp16: bool | None = None,
                 cuda_graphs: bool = False, source: tuple[str, bytes | None] | None = None, int8: bool = False):
        """`source`: (file name, bytes) of the denoiser already read (GraphRunner.take_source), used when it is the
        file this session opens."""
        info = manifest.graphs[FAMILIES[manifest.family].denoiser]
        shape = (manifest.image["channels"], manifest.image["height"], manifest.image["width"])

        def iteration_on(path: Path, device: str):
            read = source is not None and source[1] is not None and source[0] == path.name
            denoiser = onnx.load_from_string(source[1]) if read else onnx.load(str(path))
            iteration = iteration_model(denoiser, shape, state_size, manifest.num_classes, manifest.null_class)
            opened = open_session(iteration.SerializeToString(), device, threads, spin,
                                  cuda_options={"enable_cuda_graph": "1"} if cuda_graphs else None,
                                  name=f"{path.name} (iteration)")
            return iteration, opened

        path = graph_path(version_dir, info, device, fp16, int8)
        iteration, (self.session, self.device, self.device_id) = iteration_on(path, device)
        if self.device == "cpu" and path.name == info.fp16_file:  # auto fell back to the CPU: the fp32 file there
            iteration, (self.session, self.device, self.device_id) = iteration_on(Path(version_dir) / info.file, "cpu")
        opset = next(o.version for o in iteration.opset_import if o.domain in ("", "ai.onnx"))
        self.cuda_graphs = cuda_graphs and self.device == "cuda"
        admit_session, _, _ = open_session(admit_model(shape, state_size, opset).SerializeToString(),
                                           self.device if self.device == "cpu" else f"cuda:{self.device_id}",
                                           threads, spin, name="admit")
        self.admit_session = admit_session
        self.conditional = bool(manifest.num_classes)
        # integer timesteps (DDPM) or a continuous t (flows): the denoiser's own input says which
        self.time_dtype = np.dtype(next(t.dtype for t in info.inputs if t.name == "t"))
        self.image_shape = shape
        self.state_size = state_size
        self.capacity = capacity
        # a CUDA-graph run pads its rows to a bucket; padding rows point at a scratch slot past the capacity
        self.scratch = capacity
        pool_shape = (capacity + 1, state_size + KNOWN, *shape)  # the sampler state, the known image, the mask
        self._pool = [self._zeros(pool_shape), self._zeros(pool_shape)]
        self._cur = 0  # which pool buffer holds the current state
        self._buffers: dict[int, dict[str, ort.OrtValue]] = {}  # per batch size (bucket): outputs, zero noise
        self._graph_ids: dict[tuple[int, int], int] = {}  # (bucket, state buffer) -> captured CUDA graph
        self._noisy: set[int] = set()  # buckets whose noise buffer holds noise (CUDA graphs)
        self.transfers = Transfers()
        self.buckets = buckets(capacity)

    # --- device memory ---------------------------------------------------------------------------

    def _zeros(self, shape, dtype=np.float32) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, self.device_id)

    def _upload(self, array: np.ndarray) -> ort.OrtValue:
        self.transfers.uploads += 1
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, np.float32), self.device, self.device_id)

    def _download(self, value: ort.OrtValue, rows: int) -> np.ndarray:
        self.transfers.downloads += 1
        return np.array(value.numpy()[:rows])  # a copy: the buffer is reused by the next iteration

    def _bucket_buffers(self, b: int) -> dict[str, ort.OrtValue]:
        buf = self._buffers.get(b)
        if buf is None:
            image = (b, *self.image_shape)
            buf = {"x": self._zeros(image), "x0": self._zeros(image), "noise": self._zeros(image)}
            if self.cuda_graphs:  # fixed addresses for every input of a captured graph
                buf.update(slots=self._zeros((b,), np.int64), t=self._zeros((b,), self.time_dtype),
                           label=self._zeros((b,), np.int64), guidance=self._zeros((b,)),
                           conv=self._zeros((b, 3)), coef=self._zeros((b, self.state_size, self.state_size + 2)),
                           blend=self._zeros((b, 2)))
            self._buffers[b] = buf
        return buf

    # --- the loop's operations -------------------------------------------------------------------

    def admit(self, slots: np.ndarray, x_T: np.ndarray, known: np.ndarray | None = None,
              mask: np.ndarray | None = None) -> None:
        """Write new rows' initial state into their slots: x_T, the rest of the sampler state zero, then the known
        image (zeros when None) and the mask (1 = regenerate; all ones when None: nothing is kept)."""
        S = self.state_size
        values = np.zeros((len(slots), S + KNOWN, *self.image_shape), np.float32)
        values[:, 0] = x_T
        if known is not None:
            values[:, S] = known
        values[:, S + 1] = 1.0 if mask is None else mask
        binding = self.admit_session.io_binding()
        binding.bind_ortvalue_input("state", self._pool[self._cur])
        binding.bind_cpu_input("slots", np.asarray(slots, np.int64))
        binding.bind_ortvalue_input("values", self._upload(values))
        binding.bind_ortvalue_output("state_out", self._pool[1 - self._cur])
        self.admit_session.run_with_iobinding(binding)
        self._cur = 1 - self._cur

    def step(self, slots: np.ndarray, t: np.ndarray, label: np.ndarray, guidance: np.ndarray, conv: np.ndarray,
             coef: np.ndarray, noise: np.ndarray | None, blend: np.ndarray | None = None) -> IterationOutput:
        """One iteration over the rows in `slots`: their state advances on the device."""
        rows = len(slots)
        b = next(k for k in self.buckets if k >= rows) if self.cuda_graphs else rows
        feeds = {"slots": np.asarray(slots, np.int64), "t": np.asarray(t, self.time_dtype),
                 "conv": np.asarray(conv, np.float32), "coef": np.asarray(coef, np.float32),
                 "blend": np.zeros((rows, 2), np.float32) if blend is None else np.asarray(blend, np.float32)}
        if self.conditional:
            feeds.update(label=np.asarray(label, np.int64), guidance=np.asarray(guidance, np.float32))
        buf = self._bucket_buffers(b)
        binding = self.session.io_binding()
        if self.cuda_graphs:
            feeds = _pad(feeds, b, self.scratch)
            for name, value in feeds.items():
                buf[name].update_inplace(value)
                binding.bind_ortvalue_input(name, buf[name])
            if noise is not None:
                self.transfers.uploads += 1
                buf["noise"].update_inplace(_pad({"noise": np.asarray(noise, np.float32)}, b, 0)["noise"])
                self._noisy.add(b)
            elif b in self._noisy:  # back to zeros for deterministic rows (a host-to-device write, not image data)
                buf["noise"].update_inplace(np.zeros((b, *self.image_shape), np.float32))
                self._noisy.discard(b)
            binding.bind_ortvalue_input("noise", buf["noise"])
        else:
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_ortvalue_input("noise", self._upload(noise) if noise is not None else buf["noise"])
        binding.bind_ortvalue_input("state", self._pool[self._cur])
        binding.bind_ortvalue_output("state_out", self._pool[1 - self._cur])
        binding.bind_ortvalue_output("x", buf["x"])
        binding.bind_ortvalue_output("x0", buf["x0"])
        run_options = None
        if self.cuda_graphs:
            run_options = ort.RunOptions()
            key = (b, self._cur)
            run_options.add_run_config_entry("gpu_graph_id", str(self._graph_ids.setdefault(key, len(self._graph_ids))))
        self.session.run_with_iobinding(binding, run_options)
        self._cur = 1 - self._cur
        return IterationOutput(self, buf["x"], buf["x0"], rows)


def _pad(feeds: dict[str, np.ndarray], b: int, scratch: int) -> dict[str, np.ndarray]:
    """Rows padded to the bucket size b: padding rows read and write the scratch slot, with zero coefficients."""
    out = {}
    for name, value in feeds.items():
        extra = b - len(value)
        if extra <= 0:
            out[name] = value
            continue
        fill = np.full((extra, *value.shape[1:]), scratch if name == "slots" else 0, value.dtype)
        out[name] = np.concatenate([value, fill])
    return out
