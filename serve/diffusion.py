"""Step-level batching of diffusion sampling: one loop per model version, one denoiser run per iteration.

Every iteration the loop gathers up to `max_batch_size` unfinished rows of any requests (oldest request first,
then row order), whatever their step, sampler, step count, guidance and eta, and runs the model's iteration
graph once (serve/denoising.py, through serve/session.py's DenoisingSession): the denoiser on one doubled batch
for classifier-free guidance, each row's x0, and each row's sampler update from its own coefficients
(serve/samplers/). Requests join and leave between iterations; a cancelled or expired request is dropped before
the next run, so it leaves within one step.

The rows' sampler state stays on the device in `capacity` slots. A row is admitted into a free slot (its x_T
uploaded) when its request is among the oldest; its slot is freed when it finishes. Only finished images and
requested previews are copied back.

Per row (sample i of a request with seed s):
  * rng = np.random.default_rng(np.random.SeedSequence([s, i])); x_T is its first draw, then, for samplers that
    use noise and for inpainting, one draw per step in step order, so a row's result depends on nothing but its
    own parameters;
  * its request's plan (one update matrix per step), its position in the (t, t_prev) pairs of the schedule's grid.

Image-to-image (SDEdit, diffusers' img2img): a row with a known image starts at the first of its pairs
(`start_grid`: the last `steps` steps of a longer grid, the first near strength x T) from
x = alpha known + sigma x_T. Inpainting (RePaint's replacement, without its resampling) also keeps a mask: after
every step, where the mask is 0 the new sample is the known image noised to the step's end with that step's draw,
alpha' known + sigma' noise (the sampler's own noise, if it draws any, falls only where the mask is 1), so the
final image equals the known image there. The known image and mask live in the row's slot on the device with its
sampler state; plain, image-to-image and inpainting rows share every iteration.

Like the batcher, the loop is a thread (every iteration is a blocking run) and talks to callers through a
`deliver` callback, so asyncio handlers and synchronous code use it alike.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import numpy.random  # noqa: F401 - numpy loads it lazily, on first use: at import, not in the first request

from serve.batcher import Stats
from serve.errors import Cancelled, DeadlineExceeded, Internal, ResourceExhausted, ServeError, Unavailable
from serve.samplers import NoiseSchedule, Sampler, padded_plan
from serve.samplers.schedule import timestep_pairs  # noqa: F401 - the discrete rule, imported from here by others


def grid_steps(steps: int, strength: float) -> int:
    """N, the least grid with int(N strength) = steps: image-to-image runs the last `steps` steps of it, which is
    diffusers' img2img with num_inference_steps N (it runs int(N strength) steps from index N - int(N strength)),
    so the request's step count is what runs and the start is near strength x T."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    n = steps
    while int(n * strength) < steps:
        n += 1
    return n


def start_grid(schedule: NoiseSchedule, steps: int, strength: float) -> list[tuple]:
    """Image-to-image's (t, t_prev) pairs: the last `steps` of the grid of `grid_steps(steps, strength)` steps."""
    n = grid_steps(steps, strength)
    if n > schedule.T:
        raise ValueError(f"{steps} steps at strength {strength} need a grid of {n} > {schedule.T} steps")
    return schedule.pairs(n)[n - steps:]


def row_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index` of a request with `seed`: latents and noise come from it alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


@dataclass
class Progress:
    """A request's rows have all finished `step` of `total` steps; `preview` is their x0 estimate at that step."""

    step: int
    total: int
    preview: np.ndarray | None = None  # float32 NCHW in [-1, 1], every `preview_every` steps
    kind: ClassVar[str] = "progress"


@dataclass
class Done:
    images: np.ndarray  # float32 NCHW, clipped to [-1, 1]


class _Row:
    __slots__ = ("request", "index", "rng", "slot", "pos", "image", "previews")

    def __init__(self, request: GenerationRequest, index: int):
        self.request = request
        self.index = index
        self.rng = row_rng(request.seed, index)
        self.slot: int | None = None  # its state's slot on the device, once admitted
        self.pos = 0  # steps done
        self.image: np.ndarray | None = None
        self.previews: dict[int, np.ndarray] = {}  # step -> x0, kept until the request's preview is sent


class GenerationRequest:
    """One generate call inside the scheduler; `cancel()` takes it out before the next step."""

    def __init__(self, seq: int, seed: int, labels: np.ndarray, guidance: float, eta: float, sampler: type[Sampler],
                 steps: int, schedule: NoiseSchedule, state_size: int, preview_every: int, deadline: float | None,
                 deliver: Callable[[object], None], init: np.ndarray | None = None, strength: float = 1.0,
                 mask: np.ndarray | None = None):
        self.seq = seq
        self.seed = seed
        self.labels = np.asarray(labels, np.int64)
        self.guidance = float(guidance)
        self.eta = float(eta)
        self.sampler = sampler
        self.steps = steps
        # image-to-image: the last `steps` steps of a longer grid, starting near strength x T (see start_grid)
        self.init, self.mask, self.strength = init, mask, float(strength)
        self.pairs = start_grid(schedule, steps, strength) if init is not None else schedule.pairs(steps)
        if init is not None:  # x_T = a init + s noise at the first step's time (diffusers' add_noise)
            self.start = (schedule.alpha(self.pairs[0][0]), schedule.sigma(self.pairs[0][0]))
        # inpainting: after each step the kept pixels are the known image noised to that step's end
        self.blend = np.array([(schedule.alpha(tp), schedule.sigma(tp)) for _, tp in self.pairs], np.float32) \
            if mask is not None else None
        self.plan = padded_plan(sampler, schedule, self.pairs, self.eta, state_size)  # [steps, S, S + 2]
        clip = schedule.clip_range if sampler.clip_x0 else 0.0  # x0 clipped to [-clip, clip]; 0: not
        self.conv = np.array([(*schedule.to_x0(t), clip) for t, _ in self.pairs], np.float32)  # [steps, 3]
        self.noisy = sampler.uses_noise(self.eta) or mask is not None  # inpainting noises the kept pixels
        self.preview_every = preview_every
        self.deadline = deadline
        self.deliver = deliver
        self.rows: list[_Row] = []
        self.reported = 0  # last step sent as Progress
        self.cancelled = False
        self.finished = False
        self.created_ns = time.perf_counter_ns()
        self.started = False

    @property
    def n(self) -> int:
        return len(self.labels)

    def cancel(self) -> None:
        self.cancelled = True  # read by the loop between runs


class DiffusionScheduler:
    """The step-level batching loop of one diffusion model version; see the module docstring.

    `session` is a serve.session.DenoisingSession (or anything with its `admit`, `step`, `capacity` and
    `state_size`).
    """

    def __init__(self, session, schedule: NoiseSchedule, *, name: str = "diffusion", max_batch_size: int = 64,
                 max_queue_size: int = 1024):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.session = session
        self.schedule = schedule
        self.name = name
        self.max_batch_size = min(max_batch_size, session.capacity)
        self.max_queue_size = max_queue_size
        self.stats = Stats(name=name)
        self._requests: list[GenerationRequest] = []  # active, in arrival order
        self._free = list(range(session.capacity))[::-1]  # free slots; pop() takes the lowest
        self._seq = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def executions(self) -> int:
        """Iteration-graph runs so far."""
        return self.stats.execution_count

    def active(self) -> int:
        """Requests in the loop (not finished, failed or dropped yet)."""
        with self._cond:
            return len(self._requests)

    def statistics(self) -> Stats:
        with self._cond:
            return self.stats.snapshot()

    def reset_statistics(self) -> None:
        """Counters back to zero, after the warm-up requests of a load."""
        with self._cond:
            version, self.stats = self.stats.version, Stats(name=self.name)
            self.stats.version = version

    def submit(self, *, seed: int, labels: np.ndarray, guidance: float, eta: float, sampler: type[Sampler],
               steps: int, deliver: Callable[[object], None], preview_every: int = 0,
               deadline: float | None = None, init: np.ndarray | None = None, strength: float = 1.0,
               mask: np.ndarray | None = None) -> GenerationRequest:
        """Add a request (already validated); its events go to `deliver`: Progress..., then Done or an error.
        `init` [n, C, H, W] (image-to-image, and the known image of inpainting), `strength` in (0, 1], `mask`
        [n, C, H, W] of 0 (keep) and 1 (regenerate)."""
        # the plan (a matrix per step) is computed outside the lock: the loop keeps running meanwhile
        req = GenerationRequest(0, seed, labels, guidance, eta, sampler, steps, self.schedule,
                                self.session.state_size, preview_every, deadline, deliver, init, strength, mask)
        req.rows = [_Row(req, i) for i in range(req.n)]
        with self._cond:
            if self._closed:
                raise Unavailable(f"{self.name} is unloaded; retry to reach the current version")
            if len(self._requests) >= self.max_queue_size:
                error = ResourceExhausted(f"{self.name}: {self.max_queue_size} generate requests are running "
                                          "already; retry later")
                self.stats.record_done(0, error)
                raise error
            req.seq = self._seq
            self._seq += 1
            self._requests.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"diffusion-{self.name}", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req

    def close(self, drain: bool = True) -> None:
        """Refuse new requests; let the running ones finish (drain) or fail them with Unavailable."""
        with self._cond:
            self._closed = True
            if not drain:
                for req in self._requests:
                    self._end(req, Unavailable(f"{self.name} was unloaded"))
                self._requests = []
            self._cond.notify_all()

    # --- the loop --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._requests and not self._closed:
                    self._cond.wait()
                if not self._requests:
                    self._thread = None
                    return  # closed and drained
                self._prune()
                admit = self._to_admit()
            try:
                if admit:
                    self._admit(admit)
                with self._cond:
                    rows = self._pick()
                if rows:
                    self._step(rows)
            except Exception as e:  # noqa: BLE001 - fails the requests whose rows it touched, the loop goes on
                self._fail({id(r.request): r.request for r in admit}.values(), e)

    def _prune(self) -> None:
        """Drop cancelled and expired requests (under the lock)."""
        now = time.monotonic()
        keep = []
        for req in self._requests:
            if req.cancelled:
                self._end(req, Cancelled("cancelled"))
            elif req.deadline is not None and now > req.deadline:
                self._end(req, DeadlineExceeded(f"{self.name}: the deadline passed after step {req.reported} "
                                                f"of {req.steps}"))
            else:
                keep.append(req)
        self._requests = keep

    def _to_admit(self) -> list[_Row]:
        """Rows that get a free slot now, oldest request first (under the lock)."""
        rows = []
        for req in self._requests:
            for row in req.rows:
                if not self._free:
                    return rows
                if row.slot is None and row.pos < req.steps:
                    row.slot = self._free.pop()
                    rows.append(row)
        return rows

    def _pick(self) -> list[_Row]:
        """Up to max_batch_size resident unfinished rows, oldest request first (under the lock)."""
        rows: list[_Row] = []
        for req in self._requests:
            for row in req.rows:
                if row.slot is not None and row.pos < req.steps:
                    rows.append(row)
                    if len(rows) == self.max_batch_size:
                        return rows
        return rows

    def _admit(self, rows: list[_Row]) -> None:
        """Upload new rows' start: x_T (each row's first draw), noised from its known image for image-to-image;
        the known image and mask for the rows that have them."""
        x = np.stack([r.rng.standard_normal(self.session.image_shape, dtype=np.float32) for r in rows])
        known = mask = None
        if any(r.request.init is not None for r in rows):
            known = np.zeros_like(x)
            for k, r in enumerate(rows):
                if r.request.init is not None:
                    a, s = r.request.start
                    known[k] = r.request.init[r.index]
                    x[k] = np.float32(a) * known[k] + np.float32(s) * x[k]
        if any(r.request.mask is not None for r in rows):
            mask = np.stack([r.request.mask[r.index] if r.request.mask is not None
                             else np.ones(self.session.image_shape, np.float32) for r in rows])
        self.session.admit(np.array([r.slot for r in rows]), x, known, mask)

    def _step(self, rows: list[_Row]) -> None:
        t0 = time.perf_counter_ns()
        requests = list({id(r.request): r.request for r in rows}.values())
        with self._cond:
            for req in requests:
                if not req.started:
                    req.started = True
                    self.stats.record_queue(t0 - req.created_ns)
        try:
            noise = None
            if any(r.request.noisy for r in rows):
                shape = self.session.image_shape
                noise = np.stack([r.rng.standard_normal(shape, dtype=np.float32) if r.request.noisy
                                  else np.zeros(shape, np.float32) for r in rows])
            out = self.session.step(
                slots=np.array([r.slot for r in rows], np.int64),
                t=self.schedule.model_time([r.request.pairs[r.pos][0] for r in rows]),
                label=np.array([r.request.labels[r.index] for r in rows], np.int64),
                guidance=np.array([r.request.guidance for r in rows], np.float32),
                conv=np.stack([r.request.conv[r.pos] for r in rows]),
                coef=np.stack([r.request.plan[r.pos] for r in rows]),
                noise=noise,
                blend=np.stack([r.request.blend[r.pos] if r.request.blend is not None else (0.0, 0.0)
                                for r in rows]).astype(np.float32))
            t1 = time.perf_counter_ns()
            for row in rows:
                row.pos += 1
            finished = [k for k, r in enumerate(rows) if r.pos == r.request.steps]
            previews = [k for k, r in enumerate(rows) if r.request.preview_every and
                        r.pos % r.request.preview_every == 0]
            x = out.x() if finished else None  # the only copies back: finished images and previews
            x0 = out.x0() if previews else None
        except Exception as e:  # noqa: BLE001 - fails the requests of this run only
            self._fail(requests, e)
            return
        for k in previews:
            rows[k].previews[rows[k].pos] = x0[k]
        with self._cond:
            for k in finished:
                rows[k].image = x[k]
                self._free.append(rows[k].slot)
                rows[k].slot = None
        t2 = time.perf_counter_ns()
        with self._cond:  # counted before anyone hears of it: statistics read after an answer include its run
            self.stats.record_run(len(rows), 0, t1 - t0, t2 - t1)
        for req in requests:
            self._report(req)
        with self._cond:
            self._requests = [r for r in self._requests if not r.finished]

    def _fail(self, requests, e: Exception) -> None:
        error = e if isinstance(e, ServeError) else Internal(f"{self.name}: denoising step failed: {e}")
        with self._cond:
            for req in requests:
                self._end(req, error)
            self._requests = [r for r in self._requests if not r.finished]

    def _report(self, req: GenerationRequest) -> None:
        """Progress when every row of the request finished one more step; Done after the last."""
        if req.cancelled:
            return  # dropped by the next _prune
        step = min(r.pos for r in req.rows)
        while req.reported < step:
            req.reported += 1
            k = req.reported
            preview = None
            if req.preview_every and k % req.preview_every == 0:
                preview = np.stack([r.previews.pop(k) for r in req.rows])
            if k == step or preview is not None:
                self._send(req, Progress(k, req.steps, preview))
        if step == req.steps:
            images = np.clip(np.stack([r.image for r in req.rows]), -1.0, 1.0)
            self._send(req, Done(images))
            with self._cond:
                self._end(req, None)

    def _send(self, req: GenerationRequest, event: object) -> None:
        try:
            req.deliver(event)
        except Exception:  # noqa: BLE001 - the caller is gone (e.g. its event loop closed): drop the request
            req.cancelled = True

    def _end(self, req: GenerationRequest, error: ServeError | None) -> None:
        """Mark a request finished, free its slots and account for it (under the lock); errors are delivered."""
        if req.finished:
            return
        req.finished = True
        for row in req.rows:
            if row.slot is not None:
                self._free.append(row.slot)
                row.slot = None
        if error is not None and not isinstance(error, Cancelled):
            self._send(req, type(error)(error.message))
        self.stats.record_done(time.perf_counter_ns() - req.created_ns, error)
