"""The in-process serving API: the tasks, one batcher per graph, one denoising loop per diffusion model.

    from serve.runtime import Runtime
    rt = Runtime("exported")
    result = await rt.sample("gan", 8, seed=1)                 # on an event loop (grpc.aio handlers)
    result = rt.sync.sample("gan", 8, seed=1)                  # from synchronous code
    async for event in rt.generate("diffusion", 4, steps=20):  # Progress..., then Final(result)
        ...

Every task validates its arguments first (serve/validate.py: InvalidArgument naming the field), resolves the
model (serve.repository) and its family's spec (serve/families.py: which graph does what), then goes through
the graph's DynamicBatcher (or, for diffusion, the model's DiffusionScheduler), so concurrent requests share
onnxruntime runs. Applying a task to a model of the wrong family is an InvalidArgument naming `model` (as
gen.v1's proto says: Translate on a GAN).

Determinism: sample i of a request with seed s draws its latent (or x_T and the per-step noise) from
np.random.default_rng(np.random.SeedSequence([s, i])), so n=4 gives the first four images of n=8 and
a request gives the same images whatever it was batched with. Labels default to i % K.

Sessions, devices ("auto", "cpu", "cuda", "cuda:N") and IO binding are serve/session.py's; a diffusion
model's denoising loop keeps its state on the device there (serve/diffusion.py drives it).

Deadlines are absolute `time.monotonic()` values (gRPC: time.monotonic() + context.time_remaining()).
"""
from __future__ import annotations

import asyncio
import gc
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

from serve.batcher import DynamicBatcher, Stats
from serve.diffusion import DiffusionScheduler, Done, GenerationRequest, Progress, grid_steps, row_rng
from serve.errors import FailedPrecondition, InvalidArgument, NotFound, ServeError, Unavailable
from serve.families import DENOISE, FAMILIES, GAUSSIAN, FamilySpec
from serve.manifest import GraphInfo, Manifest, TensorInfo
from serve.repository import IndexEntry, ModelVersion, Repository, check_name
from serve.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, NoiseSchedule, state_size
from serve.session import CUDA, DenoisingSession, GraphRunner, Transfers, available_threads, parse_device
from serve.validate import (
    MAX_GUIDANCE,
    NP_DTYPES,
    NULL_LABEL,
    check_domains,
    check_finite,
    check_float,
    check_n,
    check_seed,
    is_int,
    labels_for,
)
from serve.validate import images as images_of
from serve.validate import tensor as tensor_of

MAX_STEPS = 1000

__all__ = ["Runtime", "SampleResult", "EncodeResult", "Progress", "Final", "GraphHandle", "GraphRunner",
           "available_threads"]


@dataclass
class SampleResult:
    """Images from sample, translate, decode and generate."""

    images: np.ndarray  # float32 NCHW in the manifest's range, [-1, 1]
    labels: np.ndarray  # int64 [n]; empty for an unconditional model or a translation
    seed: int | None  # the request's seed (drawn at random when it gave none); None where nothing is random
    model: str = ""
    version: int = 0


@dataclass
class EncodeResult:
    """A vae's posterior per image; unpacks as `mean, logvar = await rt.encode(...)`."""

    mean: np.ndarray  # float32 [n, latent]
    logvar: np.ndarray
    labels: np.ndarray  # int64 [n]; empty for an unconditional vae
    model: str = ""
    version: int = 0

    def __iter__(self):
        return iter((self.mean, self.logvar))


@dataclass
class Final:
    """The last event of `generate`: its result."""

    result: SampleResult
    kind: ClassVar[str] = "result"


@dataclass(frozen=True)
class GraphHandle:
    """One graph of a loaded version, as the OIP layer sees it: the model "<model>.<graph>"."""

    name: str  # "<model>.<graph>"
    model: str
    graph: str
    version: int
    versions: list[int]  # every READY version of the model
    info: GraphInfo  # inputs and outputs (name, dtype, shape with -1 for dynamic)
    manifest: Manifest
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int


NO_LABELS = np.zeros(0, np.int64)
# how a latent is drawn from a row's generator, by the family's FamilySpec.latent
LATENTS: dict[str, Callable[[np.random.Generator, tuple], np.ndarray]] = {
    GAUSSIAN: lambda rng, shape: rng.standard_normal(shape, dtype=np.float32),
}
# which families each task method works on, read from their specs (serve/families.py)
CAN: dict[str, Callable[[FamilySpec], bool]] = {
    "sample": lambda f: f.generator is not None,
    "encode": lambda f: f.encoder is not None,
    "decode": lambda f: f.encoder is not None,  # the generator of a family that also encodes
    "translate": lambda f: bool(f.directions),
    "generate": lambda f: f.denoiser is not None,
}


WARMUP_REQUESTS = 3  # per graph and per denoising loop at load; measured: BENCHMARKS, the first request after ready


def settle_heap() -> None:
    """Collect once, then freeze what survives out of the cyclic collector's scans: loaded models live as long as
    the server, and a full collection over a loaded server's objects (about 40,000 with the shipped models) costs
    about 10 ms (35 ms the first time), which would land on whichever request triggered it."""
    gc.unfreeze()  # what a previous load froze and an unload released can be collected now
    gc.collect()
    gc.freeze()


class Runtime:
    """The serving core; see the module docstring. Task methods are coroutines; `sync` has them blocking."""

    def __init__(self, repo_root: str | Path, device: str = "auto", max_batch_size: int | None = None,
                 max_queue_delay_ms: float | None = None, max_queue_size: int = 1024, threads: int | None = None,
                 max_n: int = 256, fp16: bool | None = None, max_steps: int = MAX_STEPS, spin: bool = True,
                 cuda_graphs: bool = False, freeze_heap: bool = False, int8: bool = False):
        """freeze_heap: the caller owns the process (gen serve, which also settles the heap once it has started):
        after every load or unload the heap is collected and frozen (settle_heap), which an embedding application
        may not want done to its own objects."""
        kind, _ = parse_device(device)
        if kind == "cuda" and CUDA not in ort.get_available_providers():
            raise FailedPrecondition(f"device='cuda': this onnxruntime has no {CUDA} (it offers "
                                     f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                                     "or use device='cpu'")
        if device != "cpu" and CUDA in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
            try:  # the CUDA and cuDNN libraries of pip's nvidia-* packages (or PyTorch's), where present
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - sessions then say what is missing
                pass
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        if max_queue_delay_ms is not None and max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms: must be >= 0, got {max_queue_delay_ms}")
        if max_n < 1:
            raise ValueError(f"max_n: must be >= 1, got {max_n}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads: must be >= 1, got {threads}")
        self.device = device
        self.threads = threads or available_threads()
        self.spin = spin
        self.max_batch_size = max_batch_size
        self.max_queue_delay_ms = max_queue_delay_ms
        self.max_queue_size = max_queue_size
        self.max_n = max_n
        self.max_steps = max_steps  # per Generate request (also bounded by the model's training timesteps)
        self.fp16 = fp16
        self.int8 = int8  # gen serve --precision int8: a graph's int8 variant on the CPU, where its manifest has one
        self.cuda_graphs = cuda_graphs  # diffusion loops on CUDA: one captured CUDA graph per batch-size bucket
        self.freeze_heap = freeze_heap
        self.peers = None  # gen serve --workers: the other workers (serve.peers.Peers), whose counters add up
        self.draining = False  # gen serve --drain-delay: not ready any more, still serving
        self._lock = threading.Lock()
        self._batchers: dict[tuple[ModelVersion, str], DynamicBatcher] = {}
        self._schedulers: dict[ModelVersion, DiffusionScheduler] = {}
        self._closed = False
        self.repository = Repository(repo_root, self._open_graph, self._prepare_version)
        self.sync = SyncRuntime(self)

    def _open_graph(self, version_dir: Path, graph: GraphInfo) -> GraphRunner:
        return GraphRunner(version_dir, graph, self.device, self.threads, self.fp16, self.spin, self.int8)

    def _prepare_version(self, mv: ModelVersion) -> dict:
        """Make a version warm before it is READY (Triton's model_warmup): each graph's batcher and a denoising
        model's scheduler are created now and answer WARMUP_REQUESTS requests on their own threads (a thread's first
        runs fault in its onnxruntime scratch memory, hundreds of pages, and run the serving code before the
        interpreter has specialised it); the iteration graph is built around the denoiser from the bytes its runner
        read (each file is read once). The counters start at zero afterwards. A graph that fails here, or a
        denoiser the builder refuses, leaves the version UNAVAILABLE."""
        sources = {name: runner.take_source() for name, runner in mv.runners.items()}  # held no longer than this
        denoiser = FAMILIES[mv.manifest.family].denoiser
        extras, made = {}, []
        try:
            for graph in mv.runners:  # one row; an unbatched graph: its own shapes (dynamic dims 1)
                batcher = self._new_batcher(mv, graph)
                made.append(batcher)
                zeros = {t.name: np.zeros(_zero_shape(t, mv.manifest.batched), NP_DTYPES[t.dtype])
                         for t in mv.manifest.graphs[graph].inputs}
                for _ in range(WARMUP_REQUESTS):
                    batcher.run_sync(zeros)
                batcher.reset_statistics()
            if denoiser is not None:
                session = DenoisingSession(mv.path, mv.manifest, state_size(), capacity=self._mbs(mv),
                                           device=self.device, threads=self.threads, spin=self.spin, fp16=self.fp16,
                                           cuda_graphs=self.cuda_graphs, source=sources.get(denoiser),
                                           int8=self.int8)
                scheduler = self._new_scheduler(mv, session)
                made.append(scheduler)
                for _ in range(WARMUP_REQUESTS):
                    _warm_generate(scheduler, mv.manifest)
                scheduler.reset_statistics()
                session.transfers = Transfers()  # a request's copies are counted from zero
                extras["denoising"] = session
        except BaseException:
            for made_one in made:
                made_one.close(drain=False)
            raise
        with self._lock:
            for graph, batcher in zip(mv.runners, made):
                self._batchers[(mv, graph)] = batcher
            if denoiser is not None:
                self._schedulers[mv] = made[-1]
        return extras

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Serving (not stopped) and not draining; a model's own readiness is in models() / resolve()."""
        return not self._closed and not self.draining

    async def start(self) -> None:
        """Nothing to do: sessions open in the constructor, worker threads on first use."""

    async def stop(self) -> None:
        """Finish queued work and stop every worker thread (off the event loop)."""
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            batchers, schedulers = list(self._batchers.values()), list(self._schedulers.values())
            self._batchers, self._schedulers = {}, {}
        for b in batchers:
            b.close(drain=True)
        for s in schedulers:
            s.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the repository --------------------------------------------------------------------------

    def models(self, model: str | None = None) -> list[dict]:
        """One dict per (model, version), ListModels' ModelInfo fields; `model` filters (NotFound if absent)."""
        names = self.repository.names()
        if model:
            check_name(model)
            if model not in names:
                raise NotFound(f"model {model!r} is not in the repository (models: {', '.join(names) or 'none'})")
            names = [model]
        rows = []
        for name in names:
            versions = self.repository.versions(name)
            all_versions = [mv.version for mv in versions if mv.version >= 1]
            for mv in versions:
                m = mv.manifest
                row = dict(name=name, version=max(mv.version, 0), versions=all_versions, family="", task="",
                           classes=[], channels=0, height=0, width=0, graphs=[], latent_size=0, state=mv.state,
                           reason=mv.reason, max_batch_size=self.max_n, samplers=[], num_train_timesteps=0)
                if m is not None:
                    row.update(family=m.family, task=m.task, classes=list(m.classes),
                               channels=m.image.get("channels", 0), height=m.image.get("height", 0),
                               width=m.image.get("width", 0), graphs=sorted(m.served_graphs))
                    spec = FAMILIES[m.family]
                    if spec.generator:
                        row["latent_size"] = int(np.prod(_input(m.graphs[spec.generator], "z").shape[1:]))
                    if spec.task == DENOISE:
                        row.update(samplers=sorted(set(m.student["samplers"].values())) if m.student
                                   else list(SAMPLERS),
                                   num_train_timesteps=int(m.diffusion["num_train_timesteps"]))
                rows.append(row)
        return rows

    def manifest(self, model: str, version: int | None = None) -> Manifest:
        """The manifest of the version a request for (model, version) gets."""
        return self.repository.resolve(model, version).manifest

    def graph(self, name: str, version: int | None = None) -> GraphHandle:
        """The OIP model "<model>.<graph>" (NotFound / Unavailable when it cannot be served)."""
        mv, graph = self.resolve_graph(name, version)
        versions = [v.version for v in self.repository.versions(mv.name) if v.ready]
        return GraphHandle(name, mv.name, graph, mv.version, versions, mv.manifest.graphs[graph], mv.manifest,
                           self._mbs(mv), self._delay(mv), self.max_queue_size)

    def resolve_graph(self, name: str, version: int | None = None) -> tuple[ModelVersion, str]:
        """"<model>.<graph>" -> (the model version, the graph name)."""
        check_name(name)
        model, _, graph = name.rpartition(".")
        if not model or model not in self.repository.names():
            hint = f"; graphs are served as <model>.<graph>, e.g. {name}.generator" if name in \
                self.repository.names() else ""
            raise NotFound(f"model {name!r} is not in the repository (models: "
                           f"{', '.join(self.repository.names()) or 'none'}){hint}")
        mv = self.repository.resolve(model, version)
        if graph not in mv.manifest.served_graphs:
            raise NotFound(f"model {name!r}: {model!r} has the graphs "
                           f"{', '.join(f'{model}.{g}' for g in sorted(mv.manifest.served_graphs))}")
        return mv, graph

    def oip_index(self) -> list[IndexEntry]:
        """RepositoryIndex with a row per graph ("<model>.<graph>"); a version without a manifest as "<model>"."""
        rows = []
        for name in self.repository.names():
            for mv in self.repository.versions(name):
                version = str(mv.version) if mv.version >= 1 else mv.path.name
                graphs = sorted(mv.manifest.served_graphs) if mv.manifest is not None else [None]
                rows += [IndexEntry(f"{name}.{g}" if g else name, version, mv.state, mv.reason) for g in graphs]
        return rows

    async def load(self, name: str) -> None:
        """Re-read a model ("<model>" or "<model>.<graph>") from disk; new versions serve once ready."""
        await asyncio.to_thread(self.load_sync, name)

    def load_sync(self, name: str) -> None:
        self._swap(self.repository.load, self._model_of(name))

    async def unload(self, name: str) -> None:
        await asyncio.to_thread(self.unload_sync, name)

    def unload_sync(self, name: str) -> None:
        self._swap(self.repository.unload, self._model_of(name))

    def _swap(self, action, model: str) -> None:
        """Load or unload, then retire the versions no longer served (also when the model left the disk)."""
        before = self.repository.versions(model)
        try:
            action(model)
        finally:
            after = set(self.repository.versions(model))
            self._retire([mv for mv in before if mv not in after])
            if self.freeze_heap:
                settle_heap()

    def _model_of(self, name: str) -> str:
        check_name(name)
        if name in self.repository.names() or (self.repository.root / name).is_dir():
            return name
        model, _, _ = name.rpartition(".")
        return model if model and model in self.repository.names() else name

    def _retire(self, versions: list[ModelVersion]) -> None:
        """Close the batchers and schedulers of versions no longer served (queued work still finishes)."""
        gone = set(versions)
        with self._lock:
            batchers = [self._batchers.pop(k) for k in [k for k in self._batchers if k[0] in gone]]
            schedulers = [self._schedulers.pop(mv) for mv in [mv for mv in self._schedulers if mv in gone]]
        for b in batchers:
            b.close(drain=True)
        for s in schedulers:
            s.close()

    # --- batchers, schedulers, statistics --------------------------------------------------------

    def batcher(self, mv: ModelVersion, graph: str) -> DynamicBatcher:
        """The batcher of one graph of a loaded version (made and warmed when the version was prepared)."""
        with self._lock:
            b = self._batchers.get((mv, graph))
            if b is None:
                self._check_serving(mv)
                raise Unavailable(f"model {mv.name!r} version {mv.version}: {graph} has no batcher; reload it")
            return b

    def scheduler(self, mv: ModelVersion) -> DiffusionScheduler:
        """The step-level scheduler of a loaded diffusion version (made and warmed when the version was prepared)."""
        with self._lock:
            s = self._schedulers.get(mv)
            if s is None:
                self._check_serving(mv)
                raise Unavailable(f"model {mv.name!r} version {mv.version} has no denoising loop; reload it")
            return s

    def _new_batcher(self, mv: ModelVersion, graph: str) -> DynamicBatcher:
        run = mv.runners[graph].run if mv.manifest.batched else _one_request(mv.runners[graph].run)
        b = DynamicBatcher(run, name=f"{mv.name}.{graph}", max_batch_size=max(self._mbs(mv), 1),
                           max_queue_delay_ms=self._delay(mv), max_queue_size=self.max_queue_size)
        b.stats.version = mv.version
        return b

    def _new_scheduler(self, mv: ModelVersion, session: DenoisingSession) -> DiffusionScheduler:
        s = DiffusionScheduler(session, NoiseSchedule.from_manifest(mv.manifest.diffusion), name=mv.name,
                               max_batch_size=self._mbs(mv), max_queue_size=self.max_queue_size)
        s.stats.version = mv.version
        return s

    def statistics(self, name: str | None = None, version: int | None = None) -> list[Stats]:
        """Counters of every graph of every READY version ("<model>.<graph>", zero until used), plus one
        per diffusion model ("<model>": its step-level scheduler); `name` and `version` filter. One of gen serve
        --workers' processes adds the other workers' counters (`peers`; it blocks while it asks them)."""
        rows = self.local_statistics(version)
        if self.peers is not None:
            mine = {(r.name, r.version): r for r in rows}
            for other in self.peers.statistics():
                for r in other:
                    if (r.name, r.version) in mine:  # a version the others serve and this one not: left out
                        mine[(r.name, r.version)].add(r)
        if name:
            check_name(name)
            rows = [r for r in rows if r.name == name]
            if not rows:
                self.resolve_graph(name, version)  # NotFound / Unavailable with the reason
        return rows

    def local_statistics(self, version: int | None = None) -> list[Stats]:
        """This process's counters (copies), as `statistics` without a name and without the other workers."""
        with self._lock:
            batchers, schedulers = dict(self._batchers), dict(self._schedulers)
        rows = []
        for model in self.repository.names():
            for mv in self.repository.versions(model):
                if not mv.ready or (version is not None and mv.version != version):
                    continue
                for graph in sorted(mv.manifest.served_graphs):
                    b = batchers.get((mv, graph))
                    rows.append(b.statistics() if b else Stats(name=f"{model}.{graph}", version=mv.version))
                if mv in schedulers:
                    rows.append(schedulers[mv].statistics())
        return rows

    def _check_serving(self, mv: ModelVersion) -> None:
        if self._closed:
            raise Unavailable("the runtime is stopped")
        if not any(v is mv for v in self.repository.versions(mv.name)):  # retired by a concurrent load
            raise Unavailable(f"model {mv.name!r} version {mv.version} was just reloaded or unloaded; retry")

    def _mbs(self, mv: ModelVersion) -> int:
        """The version's max batch size: the server's, else its manifest's; 0 for an unbatched graph (as Triton)."""
        if not mv.manifest.batched:
            return 0
        return self.max_batch_size or int(mv.manifest.serving.get("max_batch_size", 64))

    def _delay(self, mv: ModelVersion) -> float:
        if self.max_queue_delay_ms is not None:
            return self.max_queue_delay_ms
        return float(mv.manifest.serving.get("max_queue_delay_ms", 2.0))

    def _resolve(self, model: str, version: int | None, method: str) -> tuple[ModelVersion, FamilySpec]:
        """The version a request gets and its family's spec; InvalidArgument when the family cannot `method`."""
        mv = self.repository.resolve(model, version)
        spec = FAMILIES[mv.manifest.family]
        if not CAN[method](spec):
            able = [f.name for f in FAMILIES.values() if CAN[method](f)]
            oip = f"; it is served over OIP only, as {', '.join(f'{model}.{g}' for g in sorted(spec.graphs))}" \
                if not spec.images else ""
            raise InvalidArgument(f"model: {model!r} is a {spec.name} model; {method} works on "
                                     f"{' and '.join(able)} models{oip}")
        return mv, spec

    # --- tasks -----------------------------------------------------------------------------------

    async def sample(self, model: str, n: int, seed: int | None = None, labels: Sequence[int] | None = None,
                     version: int | None = None, deadline: float | None = None) -> SampleResult:
        """n images from a vae (its decoder) or gan (its generator), latents drawn from (seed, i)."""
        mv, spec = self._resolve(model, version, "sample")
        n = check_n(n, self.max_n)
        seed = check_seed(seed)
        graph = spec.generator
        info = mv.manifest.graphs[graph]
        labels = labels_for(labels, n, mv.manifest)
        z_shape = tuple(_input(info, "z").shape[1:])
        z = np.stack([LATENTS[spec.latent](row_rng(seed, i), z_shape) for i in range(n)])
        out = await self.batcher(mv, graph).run(_with_label({"z": z}, info, labels, n), deadline)
        return SampleResult(out["image"], _or_none(labels), seed, mv.name, mv.version)

    async def translate(self, model: str, images: np.ndarray, direction: str = "AtoB",
                        version: int | None = None, deadline: float | None = None) -> SampleResult:
        """pix2pix: its generator (AtoB only); cyclegan: AtoB = generator_ab, BtoA = generator_ba."""
        mv, spec = self._resolve(model, version, "translate")
        if direction not in ("AtoB", "BtoA"):
            raise InvalidArgument(f"direction: expected 'AtoB' or 'BtoA', got {direction!r}")
        graph = spec.directions.get(direction)
        if graph is None:
            raise InvalidArgument(f"direction: {model!r} is a {spec.name} model, which translates one way "
                                  f"({', '.join(spec.directions)}); train it with --direction {direction} for that")
        source = images_of(images, mv.manifest, self.max_n)
        out = await self.batcher(mv, graph).run({"source": source}, deadline)
        return SampleResult(out["image"], NO_LABELS, None, mv.name, mv.version)

    async def encode(self, model: str, images: np.ndarray, labels: Sequence[int] | None = None,
                     version: int | None = None, deadline: float | None = None) -> EncodeResult:
        """A vae's posterior (mean, logvar) per image.

        A conditional vae encodes an image given its class: pass the images' labels (one per image or
        one for all); like every task, labels default to i % K.
        """
        mv, spec = self._resolve(model, version, "encode")
        images = images_of(images, mv.manifest, self.max_n)
        info = mv.manifest.graphs[spec.encoder]
        labels = labels_for(labels, len(images), mv.manifest)
        out = await self.batcher(mv, spec.encoder).run(_with_label({"image": images}, info, labels, len(images)),
                                                    deadline)
        return EncodeResult(out["mean"], out["logvar"], _or_none(labels), mv.name, mv.version)

    async def decode(self, model: str, z: np.ndarray, labels: Sequence[int] | None = None,
                     version: int | None = None, deadline: float | None = None) -> SampleResult:
        """A vae's decoder on given latents [n, latent]; labels default to i % K on a conditional vae."""
        mv, spec = self._resolve(model, version, "decode")
        info = mv.manifest.graphs[spec.generator]
        z = tensor_of("z", z, _input(info, "z"), self.max_n)
        labels = labels_for(labels, len(z), mv.manifest)
        out = await self.batcher(mv, spec.generator).run(_with_label({"z": z}, info, labels, len(z)), deadline)
        return SampleResult(out["image"], _or_none(labels), None, mv.name, mv.version)

    async def generate(self, model: str, n: int, seed: int | None = None, labels: Sequence[int] | None = None,
                       guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
                       eta: float | None = 0.0, preview_every: int = 0, version: int | None = None,
                       deadline: float | None = None, init: np.ndarray | None = None, strength: float | None = None,
                       mask: np.ndarray | None = None) -> AsyncIterator[Progress | Final]:
        """Diffusion sampling: yields Progress(step, total, preview) after every step, then Final(result).

        guidance defaults to the model's training-time value (conditional models; ignored otherwise),
        eta None to 0. Closing the iterator or cancelling its task takes the request out of the loop
        within one step.

        Image-to-image: `init` float32 [1 or n, C, H, W] in [-1, 1] and `strength` in (0, 1] (default 1): the
        images are noised to about strength x T and `steps` steps run from there. Inpainting: also `mask`
        [1 or n, 1 or C, H, W], 1 (>= 0.5) where to regenerate, 0 where the result keeps `init`.
        """
        mv, params = self._generation(model, n, seed, labels, guidance, sampler, steps, eta, preview_every,
                                      version, deadline, init, strength, mask)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = self.scheduler(mv).submit(deliver=lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                                        **params)
        try:
            while True:
                event = _event(await events.get(), req, mv)
                yield event
                if isinstance(event, Final):
                    return
        finally:
            req.cancel()

    async def infer(self, name: str, inputs: dict[str, np.ndarray], version: int | None = None,
                    deadline: float | None = None) -> dict[str, np.ndarray]:
        """Run one graph, named "<model>.<graph>" (e.g. "gan.generator"), through its batcher (for OIP)."""
        mv, graph = self.resolve_graph(name, version)
        info = mv.manifest.graphs[graph]
        if not isinstance(inputs, dict):
            raise InvalidArgument("inputs: expected a dict of input name -> array")
        missing = [t.name for t in info.inputs if t.name not in inputs]
        extra = sorted(set(inputs) - {t.name for t in info.inputs})
        if missing or extra:
            problem = (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "")
            raise InvalidArgument(f"inputs: {name} takes {[t.name for t in info.inputs]}{problem}")
        if not mv.manifest.batched:  # whole tensors, one run per request: a batch of one to the batcher
            feeds = {t.name: _whole_tensor(inputs[t.name], t) for t in info.inputs}
            outputs = await self.batcher(mv, graph).run(feeds, deadline)
            return {k: v[0] for k, v in outputs.items()}
        feeds = {t.name: tensor_of(t.name, inputs[t.name], t, self.max_n) for t in info.inputs}
        rows = {len(v) for v in feeds.values()}
        if len(rows) != 1:
            raise InvalidArgument(f"inputs: every input of {name} needs the same batch size, got "
                                  + ", ".join(f"{k}: {len(v)}" for k, v in feeds.items()))
        if not FAMILIES[mv.manifest.family].imported:  # the label and timestep ranges of gen's own graphs
            check_domains(feeds, mv.manifest)
        return await self.batcher(mv, graph).run(feeds, deadline)

    def _generation(self, model: str, n: int, seed: int | None = None, labels: Sequence[int] | None = None,
                    guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
                    eta: float | None = 0.0,
                    preview_every: int = 0, version: int | None = None,
                    deadline: float | None = None, init: np.ndarray | None = None, strength: float | None = None,
                    mask: np.ndarray | None = None) -> tuple[ModelVersion, dict]:
        """Validate a generate request: (the model version, the scheduler's submit arguments)."""
        mv, _ = self._resolve(model, version, "generate")
        m = mv.manifest
        n = check_n(n, self.max_n)
        seed = check_seed(seed)
        student = m.student
        if student:  # a distilled student samples only as it was trained: at its step counts, with their sampler
            steps = student["default_steps"] if steps is None else steps
            if not is_int(steps) or steps not in student["steps"]:
                raise InvalidArgument(f"steps: {m.name} is a distilled student trained for "
                                      f"{', '.join(map(str, student['steps']))} steps, got {steps!r}")
            own = m.student_sampler(steps)
            sampler = own if sampler is None else sampler
            if sampler != own:
                raise InvalidArgument(f"sampler: {m.name} is a distilled student; it samples {steps} steps with "
                                      f"{own!r}, not {sampler!r}")
        sampler = DEFAULT_SAMPLER if sampler is None else sampler
        steps = DEFAULT_STEPS if steps is None else steps
        if sampler not in SAMPLERS:
            raise InvalidArgument(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
        T = int(m.diffusion["num_train_timesteps"])
        if not is_int(steps) or not 1 <= steps <= min(self.max_steps, T):
            raise InvalidArgument(f"steps: must be between 1 and {min(self.max_steps, T)}, got {steps!r}")
        if guidance is None:
            guidance = m.default_guidance
        low, high = student.get("guidance_range", (0.0, MAX_GUIDANCE)) if student else (0.0, MAX_GUIDANCE)
        guidance = check_float("guidance", guidance, low, high)  # a student knows only the scales it was taught
        if m.classes and not m.null_class and guidance != 1.0:
            raise InvalidArgument(f"guidance: {m.name} has no null class (it was exported without one), so it "
                                  f"samples only at guidance 1, got {guidance!r}")
        eta = check_float("eta", 0.0 if eta is None else eta, 0.0, 1.0)
        if not is_int(preview_every) or preview_every < 0:
            raise InvalidArgument(f"preview_every: must be an integer >= 0 (0 = no previews), got "
                                  f"{preview_every!r}")
        labels = labels_for(labels, n, m, null=m.null_class)  # -1: the null class, an unconditional row
        known = _known(m, n, self.max_n, init, strength, mask, int(steps))
        return mv, dict(seed=seed, labels=labels if labels is not None else np.zeros(n, np.int64),
                        guidance=guidance, eta=eta, sampler=SAMPLERS[sampler], steps=int(steps),
                        preview_every=int(preview_every), deadline=deadline, **known)

# --- helpers ---------------------------------------------------------------------------------------


def _input(info: GraphInfo, name: str):
    return next(t for t in info.inputs if t.name == name)


def _image_shape(m: Manifest) -> tuple[int, int, int]:
    return m.image["channels"], m.image["height"], m.image["width"]


def _or_none(labels: np.ndarray | None) -> np.ndarray:
    return NO_LABELS if labels is None else labels


def _known(m: Manifest, n: int, max_n: int, init, strength, mask, steps: int) -> dict:
    """Image-to-image and inpainting arguments of the scheduler's submit, checked: init [n, C, H, W], strength,
    mask [n, C, H, W] of 0 and 1; {} for plain generation."""
    if init is None:
        for name, value in (("strength", strength), ("mask", mask)):
            if value is not None:
                raise InvalidArgument(f"{name}: needs init images (image-to-image or inpainting starts from them)")
        return {}
    strength = 1.0 if strength is None else check_float("strength", strength, 0.0, 1.0)
    if strength == 0.0:
        raise InvalidArgument("strength: must be in (0, 1]; 0 would return the init images unchanged")
    init = _per_image("init", images_of(init, m, max_n, "init"), n)
    T, grid = int(m.diffusion["num_train_timesteps"]), grid_steps(steps, strength)
    if grid > T:  # the scheduler's start_grid would refuse it in the loop
        raise InvalidArgument(f"strength: {steps} steps at strength {strength} need a grid of {grid} > {T} steps; "
                              "give more strength or fewer steps")
    out = {"init": init, "strength": strength}
    if mask is not None:
        C, H, W = _image_shape(m)
        try:
            x = np.asarray(mask, np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"mask: not an array ({e})") from None
        if x.ndim != 4 or x.shape[1] not in (1, C) or x.shape[2:] != (H, W):
            raise InvalidArgument(f"mask: expected [1 or n, 1, {H}, {W}] (1 = regenerate, 0 = keep), matching the "
                                  f"images, got shape {list(x.shape)}")
        check_finite("mask", x)
        x = _per_image("mask", x, n)
        out["mask"] = np.ascontiguousarray(np.broadcast_to((x >= 0.5).astype(np.float32), (n, C, H, W)))
    return out


def _per_image(name: str, x: np.ndarray, n: int) -> np.ndarray:
    """One for all or one per image -> n of them."""
    if len(x) not in (1, n):
        raise InvalidArgument(f"{name}: give one for all images or one per image ({n}), got {len(x)}")
    return np.ascontiguousarray(np.broadcast_to(x, (n, *x.shape[1:])), np.float32)


def _zero_shape(t: TensorInfo, batched: bool) -> tuple[int, ...]:
    """A warm-up request's input shape as the batcher takes it: one row of a batched graph; an unbatched graph's
    own shape (dynamic dims 1) under the leading axis of one that _whole_tensor adds."""
    return (1, *(max(d, 1) for d in t.shape[1:])) if batched else (1, *(max(d, 1) for d in t.shape))


def _warm_generate(scheduler: DiffusionScheduler, m: Manifest) -> None:
    """One image through the denoising loop as a default request runs it (a student: its default steps and sampler;
    otherwise the default sampler at 2 steps: every step runs the same code); raises what the loop reported."""
    steps = m.student["default_steps"] if m.student else 2
    sampler = SAMPLERS[m.student_sampler(steps) if m.student else DEFAULT_SAMPLER]
    events: queue.SimpleQueue = queue.SimpleQueue()
    scheduler.submit(seed=0, labels=np.zeros(1, np.int64), guidance=m.default_guidance, eta=0.0, sampler=sampler,
                     steps=steps, deliver=events.put)
    while not isinstance(event := events.get(), Done):
        if isinstance(event, BaseException):
            raise event


def _whole_tensor(value, t: TensorInfo) -> np.ndarray:
    """An input of an unbatched graph (max_batch_size 0), checked against its whole shape (-1 = any), with a
    leading axis of one: the batcher then runs each request alone and as given (Triton's semantics)."""
    try:
        x = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{t.name}: not an array ({e})") from None
    if x.ndim != len(t.shape) or any(s != -1 and s != d for s, d in zip(t.shape, x.shape)):
        raise InvalidArgument(f"{t.name}: expected shape {list(t.shape)} (-1 = any), got {list(x.shape)}")
    return tensor_of(t.name, x[None], TensorInfo(t.name, t.dtype, (-1, *t.shape)), 1)


def _one_request(run: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """An unbatched graph's run as the batcher calls it: on a batch of one request (see _whole_tensor)."""
    return lambda feeds: {k: np.asarray(v)[None] for k, v in run({k: v[0] for k, v in feeds.items()}).items()}


def _event(event: object, req: GenerationRequest, mv: ModelVersion) -> Progress | Final:
    """A scheduler event as generate yields it; errors are raised."""
    if isinstance(event, ServeError):
        raise event
    if isinstance(event, Done):  # the null class K is reported as it was asked for, -1
        labels = np.where(req.labels == mv.manifest.num_classes, NULL_LABEL, req.labels) if mv.manifest.classes \
            else NO_LABELS
        return Final(SampleResult(event.images, labels, req.seed, mv.name, mv.version))
    return event


def _with_label(feeds: dict, info: GraphInfo, labels: np.ndarray | None, n: int) -> dict:
    if any(t.name == "label" for t in info.inputs):
        feeds["label"] = labels if labels is not None else np.zeros(n, np.int64)
    return feeds


class SyncRuntime:
    """Blocking versions of the task methods, for code without a running event loop.

    The batchers and the scheduler are thread-based, so each call simply runs the coroutine to
    completion on a private event loop; calling these from inside a running loop is an error (await
    the Runtime's methods there).
    """

    def __init__(self, runtime: Runtime):
        self._rt = runtime

    def sample(self, *args, **kwargs) -> SampleResult:
        return asyncio.run(self._rt.sample(*args, **kwargs))

    def translate(self, *args, **kwargs) -> SampleResult:
        return asyncio.run(self._rt.translate(*args, **kwargs))

    def encode(self, *args, **kwargs) -> EncodeResult:
        return asyncio.run(self._rt.encode(*args, **kwargs))

    def decode(self, *args, **kwargs) -> SampleResult:
        return asyncio.run(self._rt.decode(*args, **kwargs))

    def infer(self, *args, **kwargs) -> dict[str, np.ndarray]:
        return asyncio.run(self._rt.infer(*args, **kwargs))

    def generate(self, *args, **kwargs) -> Iterator[Progress | Final]:
        """A plain generator of the same events; closing it cancels the request."""
        mv, params = self._rt._generation(*args, **kwargs)
        events: queue.Queue = queue.Queue()
        req = self._rt.scheduler(mv).submit(deliver=events.put, **params)
        try:
            while True:
                event = _event(events.get(), req, mv)
                yield event
                if isinstance(event, Final):
                    return
        finally:
            req.cancel()

