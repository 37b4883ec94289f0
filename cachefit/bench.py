"""``cachefit bench``: throughput and latency of a compiled artifact run as a pipeline, against the same
model unpartitioned on one core and onnxruntime with the pipeline's total thread count.

Three systems serve the same stream of requests (``requests`` requests of ``batch`` rows each):

- *pipeline*: the artifact's stages, one worker per stage (:class:`cachefit.runtime.pipelined.PipelinedRunner`),
  each CPU stage pinned to its own core(s), requests split into micro-batches of ``micro_batch`` rows;
- *unpartitioned*: the same ONNX model compiled as one stage (``threads=1``), called one request after
  the other by a thread pinned to one core, TVM thread pool of one;
- *onnxruntime*: the ONNX model on onnxruntime's CPU provider, ``intra_op_num_threads`` = the number of
  cores the pipeline uses, sequential execution.

Each system is measured ``rounds`` times, interleaved, and its best round is reported (the machine may
be shared; the median is kept in ``to_dict()``). Latency is measured twice: per request under load
(the throughput run: requests queued behind each other) and one request at a time, each request one
compiled batch (``single``: the batch-1 latency for an artifact compiled with batch 1); the single
requests of the pipeline and of the unpartitioned model alternate, so both see the same machine.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import CachefitError, InputError
from .runtime.loader import sha256_file
from .runtime.timeline import PipelineStats, percentile

logger = logging.getLogger(__name__)


@dataclass
class SystemResult:
    """One system's measurements: the best round's throughput run and the single-request latencies."""

    name: str
    threads: int
    rows: int
    requests: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)
    single_latencies_s: list[float] = field(default_factory=list)
    round_seconds: list[float] = field(default_factory=list)
    cpu_s: float | None = None
    busiest_thread_cpu_s: float | None = None
    note: str = ""

    @property
    def throughput(self) -> float:
        """Rows per second."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "name": self.name, "threads": self.threads, "rows": self.rows, "requests": self.requests,
            "seconds": self.seconds, "throughput_rows_per_s": self.throughput,
            "median_round_throughput_rows_per_s": (self.rows / statistics.median(self.round_seconds)
                                                   if self.round_seconds else None),
            "round_seconds": self.round_seconds, "cpu_s": self.cpu_s,
            "busiest_thread_cpu_s": self.busiest_thread_cpu_s,
            "latency_p50_s": percentile(self.latencies_s, 50), "latency_p99_s": percentile(self.latencies_s, 99),
            "single_latency_p50_s": percentile(self.single_latencies_s, 50),
            "single_latency_p99_s": percentile(self.single_latencies_s, 99),
            "note": self.note,
        }


@dataclass
class BenchReport:
    artifact: str
    stages: int
    compiled_batch: int
    batch: int
    micro_batch: int
    requests: int
    cores: list
    in_flight: int
    pipeline: SystemResult
    stage_stats: PipelineStats
    unpartitioned: SystemResult | None = None
    onnxruntime: SystemResult | None = None
    max_abs_diff: float | None = None
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict:
        """Pipeline over each baseline: throughput (higher is better) and latencies (lower is better)."""
        out = {}
        for key, other in (("unpartitioned", self.unpartitioned), ("onnxruntime", self.onnxruntime)):
            if other is None:
                continue
            p = self.pipeline
            out[key] = {
                "throughput": p.throughput / other.throughput if other.throughput else float("nan"),
                "single_latency_p50": _ratio(percentile(p.single_latencies_s, 50),
                                             percentile(other.single_latencies_s, 50)),
                "single_latency_p99": _ratio(percentile(p.single_latencies_s, 99),
                                             percentile(other.single_latencies_s, 99)),
            }
            if p.busiest_thread_cpu_s and other.busiest_thread_cpu_s:
                out[key]["cpu_bound_throughput"] = other.busiest_thread_cpu_s / p.busiest_thread_cpu_s
        return out

    def to_dict(self) -> dict:
        return {
            "artifact": self.artifact, "stages": self.stages, "compiled_batch": self.compiled_batch,
            "batch": self.batch, "micro_batch": self.micro_batch, "requests": self.requests,
            "in_flight": self.in_flight,
            "cores": [list(c) if c else None for c in self.cores],
            "pipeline": self.pipeline.to_dict(), "stage_stats": self.stage_stats.to_dict(),
            "unpartitioned": self.unpartitioned.to_dict() if self.unpartitioned else None,
            "onnxruntime": self.onnxruntime.to_dict() if self.onnxruntime else None,
            "ratios": self.ratios(), "max_abs_diff_vs_unpartitioned": self.max_abs_diff, "notes": self.notes,
        }

    def format_table(self) -> str:
        cores = ";".join(",".join(map(str, c)) if c else "-" for c in self.cores)
        lines = [f"{self.artifact}: {self.stages} stage(s) on cores {cores}; compiled batch {self.compiled_batch}; "
                 f"{self.requests} requests of {self.batch} rows in micro-batches of {self.micro_batch}, "
                 f"{self.in_flight} in flight"]
        head = (f"{'system':34}{'threads':>8}{'rows/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'single p50':>12}"
                f"{'single p99':>12}")
        lines += ["", head]
        for r in (self.pipeline, self.unpartitioned, self.onnxruntime):
            if r is None:
                continue
            lines.append(f"{r.name:34}{r.threads:>8}{r.throughput:11.1f}{_ms(percentile(r.latencies_s, 50)):>9}"
                         f"{_ms(percentile(r.latencies_s, 99)):>9}{_ms(percentile(r.single_latencies_s, 50)):>12}"
                         f"{_ms(percentile(r.single_latencies_s, 99)):>12}")
        lines.append("(p50/p99: latency per request in the throughput run, queueing included; single: one request "
                     "of one compiled batch at a time)")
        for key, r in self.ratios().items():
            lines.append(f"pipeline / {key}: throughput {r['throughput']:.2f}x, single-request latency p50 "
                         f"{r['single_latency_p50']:.2f}x, p99 {r['single_latency_p99']:.2f}x")
            if "cpu_bound_throughput" in r:
                lines.append(f"  CPU-time bound (rows per CPU second of the busiest thread, what a machine without "
                             f"other jobs would allow): {r['cpu_bound_throughput']:.2f}x")
        for r in (self.pipeline, self.unpartitioned, self.onnxruntime):
            if r is not None and r.cpu_s is not None and r.seconds > 0:
                lines.append(f"{r.name}: {r.cpu_s / r.seconds:.2f} cores busy on average in the throughput run "
                             f"(CPU {r.cpu_s:.3f} s over {r.seconds:.3f} s wall)")
        if self.max_abs_diff is not None:
            lines.append(f"outputs: pipeline vs unpartitioned max |diff| {self.max_abs_diff:.3g}")
        lines += ["", "per stage (throughput run):", self.stage_stats.format_table()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.3f}"


# --- the source model ------------------------------------------------------------------------------

def find_source_model(artifact_dir: str | Path, manifest: dict, model: str | Path | None = None) -> Path:
    """The ONNX file an artifact was compiled from: ``model`` when given, else a ``.onnx`` file in the
    artifact directory or next to it whose sha256 is the manifest's ``model.sha256``."""
    info = manifest.get("model") or {}
    want = info.get("sha256")
    if model is not None:
        path = Path(model)
        if not path.is_file():
            raise CachefitError(f"--model {path} does not exist")
        if want and sha256_file(path) != want:
            logger.warning("%s is not the model %s was compiled from (sha256 differs); benchmarking it anyway",
                           path, artifact_dir)
        return path
    root = Path(artifact_dir)
    candidates = []
    if info.get("path"):
        candidates.append(Path(info["path"]))
    for folder in (root, root.parent):
        if info.get("name"):
            candidates.append(folder / f"{info['name']}.onnx")
        candidates += sorted(folder.glob("*.onnx"))
    if want:
        for c in dict.fromkeys(candidates):
            if c.is_file() and sha256_file(c) == want:
                return c
    raise CachefitError(
        f"cannot find the model {root} was compiled from (model {info.get('name')!r}, sha256 "
        f"{str(want)[:16] + '...' if want else 'unknown'}) in {root} or {root.parent}: pass --model PATH "
        "(or --no-baseline --no-onnxruntime to benchmark the pipeline alone)"
    )


def compile_unpartitioned(model: Path, manifest: dict, out_dir: Path) -> Path:
    """The same model compiled as one stage for one thread, for the stage-0 input shapes of ``manifest``.
    Reused when ``out_dir`` already holds it."""
    shapes = " ".join(f"{d['name']}:[{','.join(str(int(s)) for s in d['shape'])}]"
                      for d in manifest["stages"][0]["inputs"])
    stamp = {"model_sha256": sha256_file(model), "input_shapes": shapes, "threads": 1}
    stamp_path = out_dir / "bench-baseline.json"
    if (out_dir / "manifest.json").is_file() and stamp_path.is_file():
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return out_dir
        except json.JSONDecodeError:
            pass
    from .compiler import compile_model

    compile_model(model, target="llvm", out_dir=out_dir, input_shapes=shapes, cache="1TB", strategy="greedy",
                  devices=1, allow_spill=True, threads=1)
    stamp_path.write_text(json.dumps(stamp))
    return out_dir


# --- running the systems ---------------------------------------------------------------------

class _PinnedThread:
    """A persistent thread pinned to one core (TVM pool of one thread) that runs callables for the
    caller: the unpartitioned baseline, one core, as the pipeline's stages get one each."""

    def __init__(self, core: int | None):
        import queue

        self._jobs: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._loop, args=(core,), name="cachefit-bench-baseline", daemon=True)
        self._thread.start()

    def _loop(self, core: int | None) -> None:
        from .runtime.affinity import config_tvm_threads, pin_current_thread

        if core is not None:
            pin_current_thread([core])
        else:
            config_tvm_threads(1)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, box, done = job
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                box["error"] = exc
            done.set()

    def call(self, fn: Callable):
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def _timed(fn: Callable, arg) -> float:
    t = time.perf_counter()
    fn(arg)
    return time.perf_counter() - t


class _Sequential:
    """A one-stage artifact called directly, one compiled batch per call (no pipeline threads)."""

    def __init__(self, pipe):
        from .runtime.pipelined import batch_layout

        if len(pipe.stages) != 1:
            raise CachefitError(f"the unpartitioned baseline has {len(pipe.stages)} stages, expected 1")
        self.pipe, self.stage = pipe, pipe.stages[0]
        self.layout = batch_layout(pipe.manifest)

    def __call__(self, inputs: dict) -> dict:
        from .runtime.pipelined import check_request, join_rows, split_rows, to_device, to_host

        arrays, _ = check_request(inputs, self.pipe.inputs, self.layout)
        pieces = []
        for call in split_rows(arrays, self.layout.batched_inputs, self.layout.rows):
            outs = self.stage([to_device(a, self.stage.device) for a in call])
            pieces.append([to_host(t) for t in outs])
        joined = join_rows(pieces, self.layout.batched_outputs)
        return {d["name"]: a for d, a in zip(self.pipe.outputs, joined)}


def _time_sequential(fn: Callable, reqs: Sequence[dict], clock: Callable[[], float] = time.thread_time):
    """(wall seconds, per-request latencies, CPU seconds by ``clock``) of running ``reqs`` one by one."""
    lat = []
    c0 = clock()
    t0 = time.perf_counter()
    for r in reqs:
        t = time.perf_counter()
        fn(r)
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - t0, lat, clock() - c0


def _ort_session(model: Path, threads: int):
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(model))
    if m.ir_version > 10:
        m.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_runner(sess, descs: list[dict], batched: Sequence[bool], batch: int):
    """A callable running one request on onnxruntime: whole when its batch dimension is free, else in
    chunks of the model's fixed batch. None (with the reason) when neither fits ``batch``."""
    from .runtime.pipelined import split_rows

    by_name = {i.name: i for i in sess.get_inputs()}
    fixed = set()
    for d, b in zip(descs, batched):
        info = by_name.get(d["name"])
        if info is None:
            return None, f"onnxruntime's model has no input {d['name']!r}"
        if b:
            dim = info.shape[0] if info.shape else None
            if isinstance(dim, int) and dim > 0:
                fixed.add(dim)
    if len(fixed) > 1:
        return None, f"onnxruntime's model has several fixed batch sizes {sorted(fixed)}"
    chunk = fixed.pop() if fixed else batch
    if batch % chunk:
        return None, f"onnxruntime's model is fixed to batch {chunk}, which does not divide --batch {batch}"
    names = [d["name"] for d in descs]
    out_names = [o.name for o in sess.get_outputs()]

    def run(inputs: dict):
        arrays = [inputs[n] for n in names]
        return [sess.run(out_names, dict(zip(names, part))) for part in split_rows(arrays, batched, chunk)]

    return run, ""


# --- the benchmark ---------------------------------------------------------------------------

def bench_artifact(
    artifact: str | Path,
    *,
    batch: int | None = None,
    micro_batch: int | None = None,
    requests: int = 200,
    model: str | Path | None = None,
    cores="auto",
    queue_depth: int = 2,
    baseline: bool = True,
    onnxruntime: bool = True,
    baseline_dir: str | Path | None = None,
    latency_requests: int | None = None,
    in_flight: int | None = None,
    rounds: int = 1,
    timeline: str | Path | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchReport:
    """Benchmark ``artifact`` (see the module docstring); returns a :class:`BenchReport`.

    batch: rows per request (default: the artifact's model batch); micro_batch: rows per micro-batch
    (default: the compiled batch); requests: requests per throughput run; latency_requests: requests
    of the one-at-a-time latency run (default ``min(requests, 100)``); in_flight: requests queued in
    the pipeline during the throughput run (default: enough for ``stages + 1`` micro-batches);
    baseline_dir: where to keep (and reuse) the unpartitioned build (default: a temporary directory).
    """
    from .runtime import load
    from .runtime.pipelined import PipelinedRunner, batch_layout
    from .runtime.tools import make_inputs

    say = progress or (lambda line: None)
    if requests < 1:
        raise InputError(f"--requests {requests}: give at least 1")
    if rounds < 1:
        raise InputError(f"--rounds {rounds}: give at least 1")
    pipe = load(artifact)
    manifest = pipe.manifest
    layout = batch_layout(manifest)
    b = layout.rows
    mb_plan = (manifest.get("plan") or {}).get("micro_batch")
    default_batch = int(mb_plan["batch"]) if isinstance(mb_plan, dict) and mb_plan.get("batch") else b
    batch = int(batch) if batch is not None else default_batch
    if batch < 1 or batch % b:
        raise InputError(f"--batch {batch} is not a positive multiple of the artifact's compiled batch {b}: "
                         f"use {b}, {2 * b}, ... (or recompile with --batch {batch})")
    micro = int(micro_batch) if micro_batch is not None else b
    n_lat = min(requests, 100) if latency_requests is None else int(latency_requests)

    descs = [dict(d, shape=[batch] + list(d["shape"][1:]) if f else list(d["shape"]))
             for d, f in zip(manifest["stages"][0]["inputs"], layout.batched_inputs)]
    pool = [make_inputs(descs, "random", seed + i) for i in range(min(requests, 8))]
    reqs = [pool[i % len(pool)] for i in range(requests)]
    single_descs = [dict(d, shape=list(d["shape"])) for d in manifest["stages"][0]["inputs"]]
    single = [make_inputs(single_descs, "random", seed + 100 + i) for i in range(min(n_lat, 8))]
    single_reqs = [single[i % len(single)] for i in range(n_lat)]
    notes: list[str] = []

    runner = PipelinedRunner(pipe, micro_batch=micro, queue_depth=queue_depth, cores=cores)
    k = len(pipe.stages)
    used_cores = sorted({c for g in runner.cores if g for c in g})
    items_per_req = math.ceil(batch / micro)
    # enough micro-batches in flight for every stage to have work and one to spare: more only queues
    # requests (longer latency under load, no more throughput)
    in_flight = max(2, math.ceil((k + 1) / items_per_req)) if in_flight is None else int(in_flight)

    # the baselines
    unpart = ort_run = ort_single = base_thread = None
    if baseline or onnxruntime:
        src = find_source_model(artifact, manifest, model)
    if baseline:
        tmp = None
        if baseline_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="cachefit-bench-")
            out = Path(tmp.name)
        else:
            out = Path(baseline_dir)
        say(f"compiling the unpartitioned model {src.name} (1 stage, 1 thread) into {out}")
        base_pipe = load(compile_unpartitioned(src, manifest, out))
        unpart = _Sequential(base_pipe)
        base_thread = _PinnedThread(runner.cores[0][0] if runner.cores and runner.cores[0] else None)
    if onnxruntime:
        ort_threads = len(used_cores) or k
        sess = _ort_session(src, ort_threads)
        ort_run, why = _ort_runner(sess, descs, layout.batched_inputs, batch)
        if ort_run is None:
            notes.append(f"onnxruntime skipped: {why}")
        else:
            ort_single, _ = _ort_runner(sess, single_descs, layout.batched_inputs, b)

    # warm-up (first calls allocate memory pools, start thread pools)
    say("warming up")
    for out in runner.run_batches(reqs[: max(2, in_flight)], in_flight=in_flight):
        pass
    if unpart is not None:
        base_thread.call(lambda: [unpart(r) for r in reqs[:2]])
    if ort_run is not None:
        for r in reqs[:2]:
            ort_run(r)

    # output check: the pipeline against the unpartitioned build
    max_diff = None
    if unpart is not None:
        got = runner.run(reqs[0])
        want = base_thread.call(lambda: unpart(reqs[0]))
        max_diff = max(float(np.max(np.abs(got[n].astype("float64") - want[n].astype("float64"))))
                       for n in got)

    results: dict[str, SystemResult] = {
        "pipeline": SystemResult(f"pipeline ({k} stages)", len(used_cores) or k, requests * batch, requests,
                                 float("inf")),
    }
    if unpart is not None:
        results["unpartitioned"] = SystemResult("unpartitioned (1 stage, 1 core)", 1, requests * batch, requests,
                                                float("inf"))
    if ort_run is not None:
        results["onnxruntime"] = SystemResult(f"onnxruntime ({ort_threads} threads)", ort_threads, requests * batch,
                                              requests, float("inf"))
    best_stats = None
    for rnd in range(rounds):
        say(f"round {rnd + 1}/{rounds}: pipeline")
        runner.reset_stats()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in runner.run_batches(reqs, in_flight=in_flight):
            pass
        secs = time.perf_counter() - t0
        cpu = time.process_time() - c0
        st = runner.stats()
        r = results["pipeline"]
        r.round_seconds.append(secs)
        if secs < r.seconds:
            r.seconds, r.latencies_s, best_stats = secs, st.latencies_s, st
            r.cpu_s, r.busiest_thread_cpu_s = cpu, max(s.cpu_s for s in st.stages)
        if unpart is not None:
            say(f"round {rnd + 1}/{rounds}: unpartitioned")
            secs, lat_load, cpu = base_thread.call(lambda: _time_sequential(unpart, reqs))
            _keep(results["unpartitioned"], secs, lat_load, cpu, cpu)
        if ort_run is not None:
            say(f"round {rnd + 1}/{rounds}: onnxruntime")
            secs, lat_load, cpu = _time_sequential(ort_run, reqs, time.process_time)
            _keep(results["onnxruntime"], secs, lat_load, cpu, None)
        # one request at a time: the pipeline and the unpartitioned model interleaved request by request
        # (the same machine conditions for both); onnxruntime after them (its idle threads spin for a
        # while after each run, which would slow the request that follows)
        say(f"round {rnd + 1}/{rounds}: single-request latency")
        single_lat: dict[str, list[float]] = {key: [] for key in results}
        for q in single_reqs:
            single_lat["pipeline"].append(_timed(runner.run, q))
            if unpart is not None:
                single_lat["unpartitioned"].append(base_thread.call(lambda: _timed(unpart, q)))
        if ort_single is not None:
            single_lat["onnxruntime"] = [_timed(ort_single, q) for q in single_reqs]
        for key, lat in single_lat.items():
            r = results[key]
            if lat and (not r.single_latencies_s or percentile(lat, 50) < percentile(r.single_latencies_s, 50)):
                r.single_latencies_s = lat
    if timeline:
        runner.reset_stats()
        for _ in runner.run_batches(reqs[: min(requests, 20)], in_flight=in_flight):
            pass
        runner.plot_timeline(timeline, title=f"{Path(artifact).name}: {min(requests, 20)} requests of {batch} rows, "
                                             f"micro-batches of {micro}")
    runner.close()
    if base_thread is not None:
        base_thread.close()
    if unpart is not None and baseline_dir is None:
        del base_pipe, unpart
        tmp.cleanup()
    if rounds > 1:
        notes.append(f"best of {rounds} interleaved rounds per system (median throughput in --format json)")
    return BenchReport(
        artifact=str(artifact), stages=k, compiled_batch=b, batch=batch, micro_batch=micro, requests=requests,
        cores=runner.cores, in_flight=in_flight, pipeline=results["pipeline"], stage_stats=best_stats,
        unpartitioned=results.get("unpartitioned"), onnxruntime=results.get("onnxruntime"), max_abs_diff=max_diff,
        notes=notes,
    )


def _keep(r: SystemResult, secs: float, lat_load: list[float], cpu: float | None, busiest: float | None) -> None:
    """Record one throughput round, keeping the fastest."""
    r.round_seconds.append(secs)
    if secs < r.seconds:
        r.seconds, r.latencies_s, r.cpu_s, r.busiest_thread_cpu_s = secs, lat_load, cpu, busiest
