"""Run a loaded artifact as a real pipeline: one worker thread per stage, bounded queues between them.

A TVM VM call releases the GIL, so the stage threads compute in parallel. Requests are split into
micro-batches along the batch axis; every micro-batch flows through the stages in submission order and
the results are joined back per request, so outputs come back in the order requests were submitted.

Threads (``k`` stages)::

    submit() --q0--> [copy? -> stage 0] --q1--> [copy? -> stage 1] ... --qk--> collector -> Future

- ``q0`` (admission) is unbounded unless ``max_pending`` is given; ``q1..qk`` hold ``queue_depth``
  micro-batches each (back pressure: a fast stage waits for room, counted as *blocked*).
- A stage's worker copies its inputs onto its device (a device-to-device copy between GPU stages, host
  to device for stage 0), then runs the stage. With ``overlap_transfers`` (default: on for stages
  whose inputs come from another device) a separate copy thread per stage does the copy of micro-batch
  ``n+1`` while the stage computes micro-batch ``n``.
- The collector copies the last stage's outputs to the host, joins each request's micro-batches and
  resolves its Future (the last stage's own worker when it runs on the CPU, else a collector thread;
  Future callbacks run in that thread).
- CPU stages: each worker is pinned to its own core(s) and sizes its TVM thread pool to match
  (:mod:`cachefit.runtime.affinity`). GPU stages: each on its own device.

Faults: an exception raised by a stage fails only the request it was running, with a
:class:`StageError` naming the stage and its layer range; the request's other micro-batches are
skipped, later requests run normally. An internal error of the runner itself stops the pipeline: every
pending request fails with :class:`PipelineClosedError` and every thread exits.

Batch semantics (shared with the sequential runtime): an artifact is compiled for ``b`` rows per stage
call (``manifest["plan"]["micro_batch"]["micro_batch"]`` when the model was compiled with a micro-batch,
else the leading dimension of stage 0's first input).
Inputs whose leading dimension is ``b`` are *batched*: a request may carry any multiple of ``b`` rows of
them; they are split along axis 0 (:func:`split_rows`). Other inputs must have their compiled shape
and are given to every call unchanged. Batched outputs (leading dimension ``b``) are concatenated
along axis 0 (:func:`join_rows`); other outputs are taken from the request's first call.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ArtifactError, CachefitError, InputError
from .timeline import PipelineStats, StageStats, TimelineEvent, plot_timeline
from .weights import numpy_dtype

logger = logging.getLogger(__name__)

_POLL_S = 0.05  # how often a blocked thread looks at the stop flag


class StageError(CachefitError):
    """A stage raised while running a request; names the stage, its layer range and the request."""

    def __init__(self, stage_index: int, stage_name: str, layers: tuple, request_id: int, micro_batch: int,
                 cause: BaseException):
        self.stage_index, self.stage_name, self.layers = stage_index, stage_name, tuple(layers)
        self.request_id, self.micro_batch, self.cause = request_id, micro_batch, cause
        super().__init__(
            f"{stage_name} (layers {self.layers[0]}..{self.layers[1]}) failed on request {request_id} "
            f"(micro-batch {micro_batch}): {type(cause).__name__}: {cause}. Only this request failed; "
            "the pipeline keeps serving later requests"
        )


class PipelineClosedError(CachefitError):
    """The pipelined runner is closed (or stopped after an internal error) and takes no more requests."""


# --- request context (which request a stage thread is running) ------------------------------------

@dataclass(frozen=True)
class RequestContext:
    """What the calling stage thread is working on (``current_request()``)."""

    request_id: int
    micro_batch: int
    stage: int


_context = threading.local()


def current_request() -> RequestContext | None:
    """The request a pipeline stage thread is running right now (None outside a stage call).

    Meant for logging and tracing from code called by a stage, and for tests that make a stage fail on
    a chosen request by wrapping it.
    """
    return getattr(_context, "value", None)


# --- batch splitting (shared semantics) --------------------------------------------------------

@dataclass(frozen=True)
class BatchLayout:
    """How requests map onto stage calls: ``rows`` per call, which inputs/outputs carry the batch."""

    rows: int
    batched_inputs: tuple
    batched_outputs: tuple


def batch_layout(manifest: dict) -> BatchLayout:
    """The :class:`BatchLayout` of an artifact (see the module docstring)."""
    first = manifest["stages"][0]["inputs"]
    last = manifest["stages"][-1]["outputs"]
    mb = (manifest.get("plan") or {}).get("micro_batch")
    rows = mb.get("micro_batch") if isinstance(mb, dict) else manifest.get("micro_batch")
    if not isinstance(rows, int) or rows < 1:
        rows = int(first[0]["shape"][0]) if first and first[0]["shape"] else 1

    def batched(d):
        return bool(d["shape"]) and int(d["shape"][0]) == rows

    return BatchLayout(rows=rows, batched_inputs=tuple(batched(d) for d in first),
                       batched_outputs=tuple(batched(d) for d in last))


def split_rows(arrays: Sequence[np.ndarray], batched: Sequence[bool], size: int) -> list[list[np.ndarray]]:
    """Cut the batched arrays along axis 0 into consecutive pieces of ``size`` rows (the last may be
    shorter); unbatched arrays are repeated in every piece. Views, no copies."""
    rows = next((a.shape[0] for a, b in zip(arrays, batched) if b), size)
    return [[a[start:start + size] if b else a for a, b in zip(arrays, batched)] for start in range(0, rows, size)]


def join_rows(pieces: Sequence[Sequence[np.ndarray]], batched: Sequence[bool]) -> list[np.ndarray]:
    """Inverse of :func:`split_rows`: concatenate batched outputs along axis 0, take the others from
    the first piece."""
    if len(pieces) == 1:
        return list(pieces[0])
    return [np.concatenate([p[j] for p in pieces], axis=0) if b else pieces[0][j] for j, b in enumerate(batched)]


def check_request(inputs: Mapping[str, np.ndarray], descs: Sequence[dict], layout: BatchLayout) -> tuple[list, int]:
    """Validate a request against the model inputs; returns the arrays in input order and its rows."""
    names = [d["name"] for d in descs]
    if not isinstance(inputs, Mapping):
        raise InputError(f"inputs must be a dict of name -> array; expected names {names}")
    unknown = [n for n in inputs if n not in names]
    if unknown:
        raise InputError(f"unknown input {unknown[0]!r}; the model's inputs are {names}")
    arrays, rows = [], None
    for d, is_batched in zip(descs, layout.batched_inputs):
        name, shape = d["name"], list(d["shape"])
        if name not in inputs:
            raise InputError(f"input {name!r} ({d['dtype']}{shape}) is missing; the model's inputs are {names}")
        arr = np.asarray(inputs[name])
        want = numpy_dtype(d["dtype"])
        if arr.dtype != want:
            raise InputError(f"input {name!r} has dtype {arr.dtype}, the model expects {d['dtype']}; "
                             f"convert it (e.g. array.astype('{d['dtype']}'))")
        if is_batched:
            if arr.ndim != len(shape) or list(arr.shape[1:]) != shape[1:] or arr.shape[0] < 1:
                raise InputError(f"input {name!r} has shape {list(arr.shape)}, the model expects [n*{layout.rows}"
                                 f"{''.join(', ' + str(s) for s in shape[1:])}] (any positive multiple n of the "
                                 f"compiled batch {layout.rows})")
            if arr.shape[0] % layout.rows:
                raise InputError(f"input {name!r} has {arr.shape[0]} rows; the artifact runs {layout.rows} rows per "
                                 f"call, so a request needs a multiple of {layout.rows} rows: pad it, or recompile "
                                 "with --batch 1")
            if rows is not None and arr.shape[0] != rows:
                raise InputError(f"input {name!r} has {arr.shape[0]} rows but another batched input has {rows}; "
                                 "every batched input of a request needs the same number of rows")
            rows = arr.shape[0]
        elif list(arr.shape) != shape:
            raise InputError(f"input {name!r} has shape {list(arr.shape)}, the model expects {shape} "
                             "(it carries no batch dimension; recompile with --input-shapes for other shapes)")
        # a copy only when needed: np.ascontiguousarray would also make a 0-d input 1-d
        arrays.append(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))
    return arrays, (rows if rows is not None else layout.rows)


# --- the runner ----------------------------------------------------------------------------------

class _Stop:
    """End-of-stream marker, passed down the queues by close()."""


_STOP = _Stop()


class _Request:
    __slots__ = ("id", "future", "n_items", "received", "pieces", "error", "t_submit", "rows")

    def __init__(self, rid: int, rows: int, n_items: int):
        self.id, self.rows, self.n_items = rid, rows, n_items
        self.future: Future = Future()
        self.future.request_id = rid  # the id current_request() and StageError report
        self.received = 0
        self.pieces: list = []
        self.error: BaseException | None = None
        self.t_submit = time.perf_counter()

    @property
    def live(self) -> bool:
        return self.error is None and not self.future.cancelled()


class _Item:
    """One micro-batch: ``calls`` is one list of tensors per stage call (``rows / layout.rows`` calls)."""

    __slots__ = ("req", "index", "rows", "calls", "t_copy", "t_ready")

    def __init__(self, req: _Request, index: int, rows: int, calls: list):
        self.req, self.index, self.rows, self.calls = req, index, rows, calls
        self.t_copy = self.t_ready = 0.0


def _aligned_copy(a: np.ndarray, alignment: int = 64) -> np.ndarray:
    buf = np.empty(a.nbytes + alignment, np.uint8)
    off = (-buf.ctypes.data) % alignment
    out = buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def to_device(a: np.ndarray, device):
    """A host array as a TVM tensor on ``device``. On the CPU: a 64-byte aligned copy handed over by
    DLPack (about 5x cheaper than ``tvm.runtime.tensor`` for small arrays)."""
    import tvm

    if _is_cpu(device) and a.dtype.kind in "fiu" and a.dtype.itemsize in (1, 2, 4, 8) and a.dtype.isnative:
        try:
            t = tvm.runtime.from_dlpack(_aligned_copy(a))
            if _same_device(t.device, device):
                return t
        except (TypeError, ValueError, RuntimeError, BufferError):
            pass
    return tvm.runtime.tensor(a, device)


def to_host(t) -> np.ndarray:
    """A TVM tensor as a new numpy array (on the CPU through DLPack: a view copied at once)."""
    if _is_cpu(t.device):
        try:
            return np.from_dlpack(t).copy()
        except (TypeError, ValueError, RuntimeError, BufferError):
            pass
    return t.numpy()


def _is_cpu(device) -> bool:
    return int(device.dlpack_device_type()) == 1


def _same_device(a, b) -> bool:
    return (int(a.dlpack_device_type()), int(a.index)) == (int(b.dlpack_device_type()), int(b.index))


_live_runners: "weakref.WeakSet[PipelinedRunner]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # pragma: no cover - interpreter exit
    for runner in list(_live_runners):
        runner.close(wait=True, timeout=5.0)


class PipelinedRunner:
    """One worker per stage of a loaded :class:`cachefit.runtime.Pipeline`; use as a context manager.

    pipeline:       a loaded pipeline (``cachefit.runtime.load``); its ``stages`` list is read once here.
    micro_batch:    rows per micro-batch; a multiple of the compiled batch (default: the compiled batch).
    queue_depth:    micro-batches each inter-stage queue holds (>= 1).
    cores:          CPU placement: ``"auto"``/None (the available cores split evenly between the CPU
                    stages), ``"none"`` (no pinning, TVM's default pool), a string ``"0;1"`` / ``"0-1;2-3"``,
                    or a list of core tuples (one per stage, or one for all).
    overlap_transfers: a copy thread per stage (None: only for stages fed from another device).
    collector_thread: copy results to the host and resolve futures in a thread of its own (None: only
                    behind a GPU last stage; a CPU last stage's worker does it, saving a thread hand-off).
    max_pending:    micro-batches admitted ahead of stage 0 (submit blocks beyond it); None: unbounded.
    record_timeline: keep the last ``timeline_limit`` :class:`TimelineEvent`s for ``timeline()``.
    """

    def __init__(self, pipeline, *, micro_batch: int | None = None, queue_depth: int = 2, cores="auto",
                 overlap_transfers: bool | None = None, collector_thread: bool | None = None,
                 max_pending: int | None = None,
                 record_timeline: bool = True, timeline_limit: int = 200_000):
        from .affinity import parse_cores, plan_cores

        self.pipeline = pipeline
        self.stages = list(pipeline.stages)
        self.inputs = [dict(d) for d in pipeline.inputs]
        self.outputs = [dict(d) for d in pipeline.outputs]
        self.layout = batch_layout(pipeline.manifest)
        k = len(self.stages)
        if queue_depth < 1:
            raise CachefitError(f"queue_depth {queue_depth}: give at least 1")
        b = self.layout.rows
        self.micro_batch = int(micro_batch) if micro_batch is not None else b
        if self.micro_batch < 1 or self.micro_batch % b:
            raise CachefitError(f"micro-batch {micro_batch} is not a positive multiple of the artifact's compiled "
                                f"batch {b} (each stage call takes {b} rows): use {b}, {2 * b}, ... or recompile "
                                f"with --batch {micro_batch}")

        # CPU placement
        cpu_stages = [i for i, s in enumerate(self.stages) if _is_cpu(s.device)]
        if isinstance(cores, str) or cores is None:
            groups = parse_cores(cores)
        else:
            groups = [tuple(g) for g in cores]
        self.cores: list[tuple | None] = [None] * k
        if groups != [] and cpu_stages:
            if groups is not None and len(groups) == k and len(cpu_stages) != k:
                groups = [groups[i] for i in cpu_stages]
            placed = plan_cores(len(cpu_stages), groups)
            for i, g in zip(cpu_stages, placed):
                self.cores[i] = g

        # copy threads
        self._copy_thread = []
        for i, s in enumerate(self.stages):
            fed_from = self.stages[i - 1].device if i > 0 else None
            needs_copy = not _is_cpu(s.device) if fed_from is None else not _same_device(fed_from, s.device)
            self._copy_thread.append(needs_copy if overlap_transfers is None else bool(overlap_transfers))

        # the host copy of the results: by the last CPU stage's worker itself (one thread hand-off less
        # per request), by a collector thread behind a GPU stage (overlapping the copy with its compute)
        self._collector_thread = (not _is_cpu(self.stages[-1].device)) if collector_thread is None \
            else bool(collector_thread)
        self._queues = [_queue(max_pending or 0)] + [_queue(queue_depth) for _ in range(k)]
        self._stop = threading.Event()
        self._submit_lock = threading.Lock()
        self._done_lock = threading.Lock()
        self._closed = False
        self._broken: BaseException | None = None
        self._pending: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._timeline: collections.deque = collections.deque(maxlen=timeline_limit if record_timeline else 0)
        self._record = record_timeline
        self._latencies: collections.deque = collections.deque(maxlen=1_000_000)
        self.reset_stats()

        self._threads: list[threading.Thread] = []
        for i in range(k):
            src = self._queues[i]
            if self._copy_thread[i]:
                handoff = _queue(1)
                self._spawn(f"cachefit-copy-{i}", self._copy_worker, i, src, handoff)
                src = handoff
            self._spawn(f"cachefit-stage-{i}", self._stage_worker, i, src, self._queues[i + 1])
        if self._collector_thread:
            self._spawn("cachefit-collector", self._collector)
        _live_runners.add(self)
        logger.info("pipelined runner: %d stages, micro-batch %d rows, cores %s", k, self.micro_batch, self.cores)

    # -- public API ------------------------------------------------------------------------

    def submit(self, inputs: Mapping[str, np.ndarray]) -> Future:
        """Queue one request (dict name -> array, any multiple of the compiled batch in rows); returns a
        Future of its outputs (dict name -> numpy array). Raises InputError at once for bad inputs and
        PipelineClosedError after close()."""
        arrays, rows = check_request(inputs, self.inputs, self.layout)
        b, batched = self.layout.rows, self.layout.batched_inputs
        with self._submit_lock:
            self._raise_if_closed()
            pieces = split_rows(arrays, batched, self.micro_batch)
            req = _Request(next(self._ids), rows, len(pieces))
            with self._done_lock:
                self._pending[req.id] = req
            for index, piece in enumerate(pieces):
                calls = split_rows(piece, batched, b)
                n = next((a.shape[0] for a, f in zip(piece, batched) if f), b)
                if not self._put(self._queues[0], _Item(req, index, n, calls)):
                    break
            if self._stop.is_set():  # stopped meanwhile: nothing will run this request
                self._fail_pending()
                self._raise_if_closed()
        return req.future

    def run_batches(self, batches: Iterable[Mapping[str, np.ndarray]], *, in_flight: int | None = None,
                    return_exceptions: bool = False) -> Iterator[dict | BaseException]:
        """Submit every request of ``batches`` and yield their outputs in the same order, keeping at most
        ``in_flight`` requests queued (default ``2 * stages + 1``). A failed request raises its error
        (or is yielded as the exception with ``return_exceptions=True``)."""
        limit = max(1, in_flight if in_flight is not None else 2 * len(self.stages) + 1)
        window: collections.deque = collections.deque()

        def next_result():
            fut = window.popleft()
            if return_exceptions:
                exc = fut.exception()
                return exc if exc is not None else fut.result()
            return fut.result()

        for inputs in batches:
            window.append(self.submit(inputs))
            while len(window) >= limit:
                yield next_result()
        while window:
            yield next_result()

    def run(self, inputs: Mapping[str, np.ndarray], timeout: float | None = None) -> dict[str, np.ndarray]:
        """``submit(inputs).result(timeout)``."""
        return self.submit(inputs).result(timeout)

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Take no more requests; finish those already submitted, then stop every thread.

        With ``timeout`` (seconds), requests still running after it fail with PipelineClosedError and
        the threads are told to stop (a stage stuck inside native code cannot be interrupted: its
        daemon thread ends with the process).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._submit_lock:
            if not self._closed:
                self._closed = True
                self._put(self._queues[0], _STOP, deadline)
        if not wait:
            return
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._abort(PipelineClosedError(f"the pipeline did not finish its requests within {timeout} s of close()"))
            for t in self._threads:
                t.join(1.0)
        _live_runners.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def threads(self) -> list[threading.Thread]:
        """The runner's threads (stage workers, copy threads, collector); none is alive after close()."""
        return list(self._threads)

    def __enter__(self) -> "PipelinedRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- accounting ----------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Start a new measurement window: accounting, latencies and timeline (call it while no request
        is running)."""
        self._t_window = time.perf_counter()
        self._timeline.clear()
        self._stage_stats = [StageStats(i, s.name, tuple(s.layers), self.cores[i]) for i, s in enumerate(self.stages)]
        self._latencies.clear()
        self._n_done = self._n_failed = self._rows_done = 0
        self._t_last = self._t_window

    def stats(self) -> PipelineStats:
        """Per-stage compute / transfer / blocked / idle seconds and request latencies since the window
        began (``reset_stats``), the window ending at the last completed request."""
        end = self._t_last if self._n_done else time.perf_counter()
        window = max(0.0, end - self._t_window)
        stages = []
        for s in self._stage_stats:
            copy = StageStats(**{**s.__dict__})
            copy.window_s = window
            stages.append(copy)
        return PipelineStats(stages=stages, window_s=window, requests=self._n_done, failed_requests=self._n_failed,
                             rows=self._rows_done, latencies_s=list(self._latencies))

    def timeline(self) -> list[TimelineEvent]:
        """The recorded micro-batch runs, oldest first."""
        return list(self._timeline)

    def plot_timeline(self, path, *, title: str | None = None):
        """Draw :meth:`timeline` to ``path`` (PNG; needs matplotlib)."""
        return plot_timeline(self.timeline(), [s.name for s in self.stages], path, title=title)

    # -- threads -------------------------------------------------------------------------------

    def _spawn(self, name, target, *args) -> None:
        t = threading.Thread(target=self._guard, args=(target, *args), name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _guard(self, target, *args) -> None:
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - a bug in the runner: stop cleanly, fail everything
            logger.exception("pipeline thread %s failed; stopping the pipeline", threading.current_thread().name)
            self._abort(exc)

    def _get(self, q):
        """Next item of ``q``; None once the pipeline is stopped."""
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if self._stop.is_set():
                    return None

    def _put(self, q, item, deadline: float | None = None) -> bool:
        """Put ``item`` into ``q`` (waiting for room); False once the pipeline is stopped or at
        ``deadline`` (``time.monotonic()``)."""
        while True:
            try:
                q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                if self._stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                    return False

    def _copy_in(self, i: int, item: _Item) -> None:
        """Copy a micro-batch's inputs onto stage ``i``'s device (host arrays for stage 0)."""
        dev = self.stages[i].device
        item.t_copy = time.perf_counter()
        calls = []
        for args in item.calls:
            moved = []
            for a in args:
                if isinstance(a, np.ndarray):
                    moved.append(to_device(a, dev))
                elif _same_device(a.device, dev):
                    moved.append(a)
                else:  # device to device (peer copy between GPUs)
                    moved.append(a.copyto(dev))
                    if not _is_cpu(a.device):
                        a.device.sync()
            calls.append(moved)
        if not _is_cpu(dev):
            dev.sync()
        item.calls = calls
        item.t_ready = time.perf_counter()

    def _fail(self, i: int, item: _Item, exc: BaseException) -> None:
        st = self.stages[i]
        req = item.req
        if req.error is None:
            req.error = StageError(i, st.name, tuple(st.layers), req.id, item.index, exc)
            req.error.__cause__ = exc
            logger.warning("%s", req.error)
        item.calls = None

    def _copy_worker(self, i: int, src, dst) -> None:
        """Copy thread of stage ``i``: moves inputs onto the stage's device ahead of its compute."""
        if self.cores[i]:
            from .affinity import pin_current_thread

            pin_current_thread(self.cores[i])
        while True:
            item = self._get(src)
            if item is None:
                return
            if item is not _STOP and item.req.live:
                try:
                    self._copy_in(i, item)
                except Exception as exc:  # noqa: BLE001 - reported on the request
                    self._fail(i, item, exc)
            if not self._put(dst, item) or item is _STOP:
                return

    def _stage_worker(self, i: int, src, dst) -> None:
        stage = self.stages[i]
        if self.cores[i]:
            from .affinity import pin_current_thread

            pin_current_thread(self.cores[i])
        prefetched = self._copy_thread[i]
        cpu = _is_cpu(stage.device)
        collect = i == len(self.stages) - 1 and not self._collector_thread
        cpu_mark = time.thread_time()
        while True:
            item = self._get(src)
            if item is None:
                return
            if item is _STOP:
                if not collect:
                    self._put(dst, item)
                return
            if item.req.live:
                self._run_stage(i, stage, item, prefetched, cpu)
            if collect:
                self._collect(item)
            else:
                t_put = time.perf_counter()
                if not self._put(dst, item):
                    return
                self._stage_stats[i].blocked_s += time.perf_counter() - t_put
            cpu_now = time.thread_time()
            self._stage_stats[i].cpu_s += cpu_now - cpu_mark
            cpu_mark = cpu_now

    def _run_stage(self, i: int, stage, item: _Item, prefetched: bool, cpu: bool) -> None:
        """Copy in (unless a copy thread did) and run stage ``i`` on one micro-batch; record its times."""
        req = item.req
        failed = False
        t_compute = None
        try:
            if not prefetched:
                self._copy_in(i, item)
            t_compute = time.perf_counter()
            outs = []
            for args in item.calls:
                _context.value = RequestContext(req.id, item.index, i)
                outs.append(stage(args))
            if not cpu:
                stage.device.sync()
            item.calls = outs
        except Exception as exc:  # noqa: BLE001 - reported on the request
            failed = True
            self._fail(i, item, exc)
        finally:
            _context.value = None
        t_end = time.perf_counter()
        if t_compute is None:  # failed while copying
            t_compute = t_end
        if item.t_ready == 0.0:
            item.t_copy = item.t_ready = t_compute
        s = self._stage_stats[i]
        s.micro_batches += 1
        s.failed += failed
        s.transfer_s += item.t_ready - item.t_copy
        s.compute_s += t_end - t_compute
        if self._record:
            self._timeline.append(TimelineEvent(i, req.id, item.index, item.rows, item.t_copy, t_compute, t_end,
                                                failed))
        item.t_copy = item.t_ready = 0.0

    def _collector(self) -> None:
        while True:
            item = self._get(self._queues[-1])
            if item is None or item is _STOP:
                return
            self._collect(item)

    def _collect(self, item: _Item) -> None:
        """Copy a finished micro-batch to the host; resolve its request once all its micro-batches are in."""
        req = item.req
        if req.live:
            try:
                n_out = len(self.outputs)
                for outs in item.calls:
                    if len(outs) != n_out:
                        raise ArtifactError(f"the last stage returned {len(outs)} tensors, the manifest lists "
                                            f"{n_out} outputs")
                    req.pieces.append([to_host(t) for t in outs])
            except Exception as exc:  # noqa: BLE001 - reported on the request
                self._fail(len(self.stages) - 1, item, exc)
        item.calls = None
        req.received += 1
        if req.received == req.n_items:
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        with self._done_lock:
            if self._pending.pop(req.id, None) is None:
                return  # already failed by _abort
            now = time.perf_counter()
            self._t_last = now
            self._n_done += 1
            if req.error is not None:
                self._n_failed += 1
            elif not req.future.cancelled():
                self._rows_done += req.rows
                self._latencies.append(now - req.t_submit)
        if not req.future.set_running_or_notify_cancel():
            return
        if req.error is not None:
            req.future.set_exception(req.error)
            return
        try:
            arrays = join_rows(req.pieces, self.layout.batched_outputs)
        except Exception as exc:  # noqa: BLE001
            req.future.set_exception(exc)
            return
        req.pieces = []
        req.future.set_result({d["name"]: a for d, a in zip(self.outputs, arrays)})

    def _abort(self, exc: BaseException) -> None:
        """Stop every thread and fail every pending request (internal error or close() timeout)."""
        if self._broken is None:
            self._broken = exc
        self._closed = True
        self._stop.set()
        self._fail_pending()

    def _fail_pending(self) -> None:
        exc = self._broken
        with self._done_lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for req in pending:
            if req.future.set_running_or_notify_cancel():
                if isinstance(exc, PipelineClosedError):
                    err = exc
                else:
                    err = PipelineClosedError(
                        f"the pipeline stopped after an internal error ({type(exc).__name__}: {exc}); request "
                        f"{req.id} did not run to the end. Load the artifact again to continue")
                    err.__cause__ = exc
                req.future.set_exception(err)

    def _raise_if_closed(self) -> None:
        if self._broken is not None:
            raise PipelineClosedError(f"the pipeline stopped after an error ({type(self._broken).__name__}: "
                                      f"{self._broken}); load the artifact again") from self._broken
        if self._closed:
            raise PipelineClosedError("the pipeline is closed: submit requests before close(), or start a new one "
                                      "(Pipeline.start())")


def _queue(maxsize: int) -> queue.Queue:
    return queue.Queue(maxsize=maxsize)


def run_timeline(pipeline, inputs: Mapping[str, np.ndarray], path, *, repeat: int = 1,
                 micro_batch: int | None = None, cores="auto") -> PipelineStats:
    """``cachefit run --timeline``: run ``inputs`` ``repeat`` times through a pipelined runner, draw the
    timeline to ``path`` and return the per-stage accounting."""
    if repeat < 1:
        raise InputError(f"--repeat {repeat}: give at least 1")
    with PipelinedRunner(pipeline, micro_batch=micro_batch, cores=cores) as runner:
        for _ in runner.run_batches(inputs for _ in range(repeat)):
            pass
        stats = runner.stats()
        runner.plot_timeline(path, title=f"{repeat} request(s) through {len(runner.stages)} stages")
    return stats
