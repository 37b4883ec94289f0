"""The pipelined runtime (cachefit.runtime.pipelined): one worker per stage, micro-batches, order, faults.

The artifacts are a tiny MLP (6 x [64 x 64 matmul + bias + ReLU]) compiled once per module into 3 CPU
stages for a compiled batch of 4 rows. Requests carry any multiple of 4 rows ("random batch sizes" =
4, 8, ..., 20 rows); the runner cuts them into micro-batches of 8 rows (two stage calls each) and joins
the outputs. References come from numpy on the ONNX file's own weights.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import cachefit.runtime as rt
from cachefit.errors import CachefitError, InputError
from cachefit.runtime.pipelined import (
    PipelineClosedError,
    PipelinedRunner,
    StageError,
    batch_layout,
    current_request,
    join_rows,
    split_rows,
)

HIDDEN, LAYERS, BATCH = 64, 6, 4


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    """(onnx path, 3-stage artifact dir, numpy reference function)."""
    from cachefit import models
    from cachefit.compiler import compile_model

    root = tmp_path_factory.mktemp("pipelined")
    path = models.export("mlp", root / "mlp.onnx", layers=LAYERS, hidden=HIDDEN, batch=BATCH)
    out = root / "build"
    compile_model(path, target="llvm", out_dir=out, cache="2MB", strategy="balanced", devices=3, threads=1)
    weights = {t.name: numpy_helper.to_array(t).astype("float64") for t in onnx.load(str(path)).graph.initializer}

    def reference(x: np.ndarray) -> np.ndarray:
        y = x.astype("float64")
        for i in range(LAYERS):
            y = np.maximum(y @ weights[f"layers.{i}.fc.weight"] + weights[f"layers.{i}.fc.bias"], 0.0)
        return y

    return path, out, reference


@pytest.fixture
def pipe(mlp):
    p = rt.load(mlp[1])
    yield p
    p.close()


def _close_to(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and float(np.abs(got - want).max()) <= 1e-4 * (float(np.abs(want).max()) + 1e-6)


def _requests(n: int, seed: int, max_calls: int = 5) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((BATCH * int(rng.integers(1, max_calls + 1)), HIDDEN)).astype("float32")}
            for _ in range(n)]


class FailOn:
    """Test hook: wraps a loaded stage and raises when it runs the chosen request (and micro-batch)."""

    def __init__(self, stage, request_id: int, micro_batch: int | None = None, exc: BaseException | None = None):
        self._stage, self.request_id, self.micro_batch = stage, request_id, micro_batch
        self.exc = exc or RuntimeError("injected fault")
        self.seen: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self._stage, name)

    def __call__(self, args):
        ctx = current_request()
        self.seen.append((ctx.request_id, ctx.micro_batch))
        if ctx.request_id == self.request_id and self.micro_batch in (None, ctx.micro_batch):
            raise self.exc
        return self._stage(args)


def test_layout_and_split_join_roundtrip(mlp):
    """The compiled batch is stage 0's leading dimension; split_rows/join_rows are inverse along axis 0."""
    manifest = json.loads((mlp[1] / "manifest.json").read_text())
    layout = batch_layout(manifest)
    assert layout.rows == BATCH and layout.batched_inputs == (True,) and layout.batched_outputs == (True,)
    x = np.arange(10 * 3).reshape(10, 3)
    mask = np.ones((1, 3))
    pieces = split_rows([x, mask], [True, False], 4)
    assert [p[0].shape[0] for p in pieces] == [4, 4, 2]
    assert all(p[1] is mask for p in pieces)
    joined = join_rows([[p[0], p[1]] for p in pieces], [True, False])
    assert np.array_equal(joined[0], x) and joined[1] is mask


@pytest.mark.slow
def test_soak_10000_requests_in_order(pipe, mlp):
    """10,000 requests of random batch sizes through 3 CPU stages: each output is its own request's
    reference (nothing lost, reordered or duplicated), futures complete in submission order."""
    reference = mlp[2]
    reqs = _requests(10_000, seed=1)
    done_order: list[int] = []
    with PipelinedRunner(pipe, micro_batch=2 * BATCH, cores="none", record_timeline=False) as runner:
        futures = []
        for r in reqs:
            f = runner.submit(r)
            f.add_done_callback(lambda f: done_order.append(f.request_id))
            futures.append(f)
        outs = [f.result(timeout=300) for f in futures]
        stats = runner.stats()
    rows = np.concatenate([r["x"] for r in reqs])
    want = reference(rows)
    start = 0
    for i, (r, o) in enumerate(zip(reqs, outs)):
        n = r["x"].shape[0]
        assert set(o) == {"y"}
        assert _close_to(o["y"], want[start:start + n]), f"request {i}: output is not its own reference"
        start += n
    assert done_order == list(range(len(reqs)))
    items = sum(-(-r["x"].shape[0] // (2 * BATCH)) for r in reqs)
    assert [s.micro_batches for s in stats.stages] == [items] * 3  # every micro-batch ran once per stage
    assert stats.requests == len(reqs) and stats.failed_requests == 0 and stats.rows == rows.shape[0]
    assert not any(t.is_alive() for t in runner.threads)


def test_pipelined_matches_sequential_run(pipe, mlp):
    """A request of one compiled batch gives bitwise the sequential Pipeline.run result; run_batches
    yields results in input order, also with a copy thread per stage."""
    reqs = [{"x": r["x"][:BATCH]} for r in _requests(6, seed=2)]
    want = [pipe.run(r)["y"] for r in reqs]
    with PipelinedRunner(pipe, overlap_transfers=True, queue_depth=1) as runner:
        got = [o["y"] for o in runner.run_batches(reqs, in_flight=3)]
        assert sum(t.name.startswith("cachefit-copy-") for t in runner.threads) == 3
    assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_stage_fault_fails_only_its_request(pipe, mlp):
    """Stage 1 raises on request 7: that request fails with a StageError naming stage_1 and its layer
    range; the other requests (before and after) complete correctly; nothing hangs."""
    reference = mlp[2]
    manifest = json.loads((mlp[1] / "manifest.json").read_text())
    first, last = manifest["stages"][1]["layers"]["first"], manifest["stages"][1]["layers"]["last"]
    pipe.stages[1] = FailOn(pipe.stages[1], request_id=7)
    reqs = _requests(20, seed=3)
    with PipelinedRunner(pipe, micro_batch=BATCH) as runner:
        futures = [runner.submit(r) for r in reqs]
        for i, (f, r) in enumerate(zip(futures, reqs)):
            if i == 7:
                err = f.exception(timeout=60)
                assert isinstance(err, StageError) and isinstance(err, CachefitError)
                assert (err.stage_index, err.stage_name, err.layers, err.request_id) == (1, "stage_1", (first, last), 7)
                assert "stage_1" in str(err) and f"layers {first}..{last}" in str(err) and "request 7" in str(err)
                assert isinstance(err.__cause__, RuntimeError)
                with pytest.raises(StageError):
                    f.result()
            else:
                assert _close_to(f.result(timeout=60)["y"], reference(r["x"]))
        later = runner.submit(reqs[0])  # the pipeline still serves requests
        assert _close_to(later.result(timeout=60)["y"], reference(reqs[0]["x"]))
        stats = runner.stats()
    assert stats.failed_requests == 1 and stats.stages[1].failed == 1
    assert not any(t.is_alive() for t in runner.threads)


def test_fault_in_one_micro_batch_skips_the_rest_of_the_request(pipe, mlp):
    """A request of 3 micro-batches failing in stage 0 on its 2nd: later stages never run any of its
    micro-batches after the failure, stage 0 skips its 3rd, the request fails once."""
    big = {"x": np.random.default_rng(4).standard_normal((3 * BATCH, HIDDEN)).astype("float32")}
    small = _requests(3, seed=5, max_calls=1)
    pipe.stages[0] = hook0 = FailOn(pipe.stages[0], request_id=1, micro_batch=1)
    pipe.stages[2] = hook2 = FailOn(pipe.stages[2], request_id=-1)
    with PipelinedRunner(pipe, micro_batch=BATCH, queue_depth=1) as runner:
        futures = [runner.submit(r) for r in (small[0], big, small[1], small[2])]
        with pytest.raises(StageError, match="stage_0 .*request 1 \\(micro-batch 1\\)"):
            futures[1].result(timeout=60)
        for f, r in zip((futures[0], futures[2], futures[3]), small):
            assert _close_to(f.result(timeout=60)["y"], mlp[2](r["x"]))
    assert (1, 2) not in hook0.seen and (1, 1) in hook0.seen
    assert (1, 1) not in hook2.seen and (1, 2) not in hook2.seen


def test_internal_error_shuts_the_pipeline_down(pipe):
    """An error that is not a stage's Exception (here a BaseException) stops the pipeline: the running and
    pending requests fail with PipelineClosedError, submit is refused, every thread exits."""

    class Fatal(BaseException):
        pass

    pipe.stages[1] = FailOn(pipe.stages[1], request_id=2, exc=Fatal("boom"))
    reqs = _requests(10, seed=6, max_calls=1)
    runner = PipelinedRunner(pipe, micro_batch=BATCH)
    futures = [runner.submit(r) for r in reqs]
    errors = [f.exception(timeout=60) for f in futures]  # every request ends, none waits forever
    assert isinstance(errors[2], PipelineClosedError) and "Fatal" in str(errors[2])
    assert all(e is None or isinstance(e, PipelineClosedError) for e in errors)
    assert all(isinstance(e, PipelineClosedError) for e in errors[2:])  # none got past stage 1
    with pytest.raises(PipelineClosedError):
        runner.submit(reqs[0])
    runner.close(timeout=10)
    assert not any(t.is_alive() for t in runner.threads)


def test_close_timeout_fails_stuck_requests(pipe):
    """A stage stuck longer than close()'s timeout: its requests fail with PipelineClosedError instead of
    waiting forever."""
    release = threading.Event()
    inner = pipe.stages[0]

    class Stuck(FailOn):
        def __call__(self, args):
            release.wait(30)
            return inner(args)

    pipe.stages[0] = Stuck(inner, request_id=-1)
    runner = PipelinedRunner(pipe)
    futures = [runner.submit(r) for r in _requests(3, seed=7, max_calls=1)]
    t0 = time.monotonic()
    runner.close(timeout=0.3)
    assert time.monotonic() - t0 < 10
    assert all(isinstance(f.exception(timeout=1), PipelineClosedError) for f in futures)
    release.set()
    for t in runner.threads:
        t.join(10)
    assert not any(t.is_alive() for t in runner.threads)


def test_submit_after_close_and_bad_requests(pipe):
    """Bad inputs are refused at submit with InputError naming the numbers; close() refuses new work."""
    runner = PipelinedRunner(pipe)
    x = np.zeros((BATCH, HIDDEN), "float32")
    with pytest.raises(InputError, match="6 rows.*multiple of 4"):
        runner.submit({"x": np.zeros((6, HIDDEN), "float32")})
    with pytest.raises(InputError, match="dtype float64"):
        runner.submit({"x": x.astype("float64")})
    with pytest.raises(InputError, match=r"shape \[4, 65\]"):
        runner.submit({"x": np.zeros((BATCH, HIDDEN + 1), "float32")})
    with pytest.raises(InputError, match="unknown input 'z'"):
        runner.submit({"x": x, "z": x})
    with pytest.raises(InputError, match="'x'.*missing"):
        runner.submit({})
    runner.close()
    with pytest.raises(PipelineClosedError, match="closed"):
        runner.submit({"x": x})
    with pytest.raises(CachefitError, match="micro-batch 6 is not a positive multiple of .* compiled batch 4"):
        PipelinedRunner(pipe, micro_batch=6)


def test_pipeline_delegates_submit_run_batches_close(mlp):
    """Pipeline.submit / run_batches start the workers on first use; the context manager closes them."""
    reqs = _requests(5, seed=8)
    with rt.load(mlp[1]) as p:
        f = p.submit(reqs[0])
        outs = list(p.run_batches(reqs[1:]))
        runner = p._runner
        assert _close_to(f.result(timeout=60)["y"], mlp[2](reqs[0]["x"]))
        assert all(_close_to(o["y"], mlp[2](r["x"])) for o, r in zip(outs, reqs[1:]))
        runner2 = p.start(micro_batch=2 * BATCH)
        assert runner.closed and runner2.micro_batch == 2 * BATCH
        assert _close_to(p.submit(reqs[0]).result(timeout=60)["y"], mlp[2](reqs[0]["x"]))
    assert runner2.closed and not any(t.is_alive() for t in runner.threads + runner2.threads)


def test_run_batches_return_exceptions(pipe, mlp):
    pipe.stages[2] = FailOn(pipe.stages[2], request_id=1)
    reqs = _requests(4, seed=9, max_calls=2)
    with PipelinedRunner(pipe) as runner:
        outs = list(runner.run_batches(reqs, return_exceptions=True))
    assert isinstance(outs[1], StageError) and outs[1].stage_name == "stage_2"
    assert all(_close_to(outs[i]["y"], mlp[2](reqs[i]["x"])) for i in (0, 2, 3))


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="needs Linux affinity")
def test_workers_pinned_to_their_cores(pipe):
    """Each stage's worker runs on the cores it was given (seen from inside the stage call)."""
    from cachefit.runtime.affinity import available_cores, current_thread_cores

    cores = available_cores()
    groups = [(cores[i % len(cores)],) for i in range(3)]
    seen = {}

    class Record(FailOn):
        def __call__(self, args):
            seen[current_request().stage] = current_thread_cores()
            return self._stage(args)

    for i in range(3):
        pipe.stages[i] = Record(pipe.stages[i], request_id=-1)
    with PipelinedRunner(pipe, cores=groups) as runner:
        runner.run({"x": np.zeros((BATCH, HIDDEN), "float32")}, timeout=60)
    assert seen == {i: set(g) for i, g in enumerate(groups)}
    assert runner.cores == groups


def test_plan_cores():
    from cachefit.runtime.affinity import parse_cores, plan_cores

    assert plan_cores(2, None, available=[0, 1, 2, 3]) == [(0, 1), (2, 3)]
    assert plan_cores(3, None, available=[0, 1]) == [(0,), (1,), (0,)]
    assert plan_cores(2, [(1,)], available=[0, 1]) == [(1,), (1,)]
    assert parse_cores("0-1;2,3") == [(0, 1), (2, 3)] and parse_cores("auto") is None and parse_cores("none") == []
    with pytest.raises(CachefitError, match="not available"):
        plan_cores(2, [(0,), (7,)], available=[0, 1])
    with pytest.raises(CachefitError, match="3 core groups given for 2 stages"):
        plan_cores(2, [(0,), (1,), (0,)], available=[0, 1])
    with pytest.raises(CachefitError, match="malformed core list"):
        parse_cores("a;b")


def test_stats_timeline_and_picture(pipe, tmp_path):
    """Accounting covers every micro-batch; timeline events are ordered per stage and well formed; the
    picture is a PNG. Without matplotlib the error says how to install it."""
    reqs = _requests(6, seed=10)
    with PipelinedRunner(pipe, micro_batch=BATCH) as runner:
        list(runner.run_batches(reqs))
        events = runner.timeline()
        stats = runner.stats()
        png = runner.plot_timeline(tmp_path / "t.png")
    items = sum(r["x"].shape[0] // BATCH for r in reqs)
    assert len(events) == 3 * items
    for s in range(3):
        lane = [e for e in events if e.stage == s]
        assert [(e.request, e.micro_batch) for e in lane] == sorted((e.request, e.micro_batch) for e in lane)
        assert all(e.t_start <= e.t_compute <= e.t_end for e in lane)
        assert all(a.t_end <= b.t_start for a, b in zip(lane, lane[1:]))  # one worker per stage
    assert [s.micro_batches for s in stats.stages] == [items] * 3
    assert all(s.compute_s > 0 and 0 < s.utilisation <= 1 for s in stats.stages)
    assert stats.rows == sum(r["x"].shape[0] for r in reqs) and len(stats.latencies_s) == len(reqs)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from cachefit.runtime.timeline import plot_timeline

    saved = sys.modules.get("matplotlib")
    sys.modules["matplotlib"] = None
    try:
        with pytest.raises(CachefitError, match="pip install"):
            plot_timeline(events, ["a", "b", "c"], tmp_path / "u.png")
    finally:
        sys.modules["matplotlib"] = saved


def test_cli_run_timeline(mlp, tmp_path):
    from cachefit.cli import main

    png = tmp_path / "timeline.png"
    res = CliRunner().invoke(main, ["run", str(mlp[1]), "--timeline", str(png), "--repeat", "3",
                                    "--no-print-outputs"])
    assert res.exit_code == 0, res.output
    assert "stage_2" in res.output and f"wrote {png}" in res.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bench(mlp, tmp_path):
    """cachefit bench prints the three systems and their ratios; the source model is found by its
    sha256 next to the artifact, and the pipeline agrees with the unpartitioned build."""
    from cachefit.cli import main

    res = CliRunner().invoke(main, ["bench", str(mlp[1]), "--requests", "8", "--batch", str(2 * BATCH),
                                    "--latency-requests", "4", "--format", "json",
                                    "--baseline-dir", str(tmp_path / "base")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["stages"] == 3 and report["batch"] == 2 * BATCH and report["compiled_batch"] == BATCH
    assert report["pipeline"]["rows"] == 8 * 2 * BATCH
    assert report["unpartitioned"]["throughput_rows_per_s"] > 0 and report["onnxruntime"]["threads"] >= 1
    assert set(report["ratios"]) == {"unpartitioned", "onnxruntime"}
    assert report["max_abs_diff_vs_unpartitioned"] < 1e-3
    assert [s["micro_batches"] for s in report["stage_stats"]["stages"]] == [16] * 3
    assert json.loads((tmp_path / "base" / "manifest.json").read_text())["stages"][0]["layers"] == {
        "first": 0, "last": LAYERS - 1, "names": [f"layers.{i}" for i in range(LAYERS)]}


def test_cli_bench_needs_the_model(mlp, tmp_path):
    """Without the ONNX file next to the artifact, bench asks for --model."""
    import shutil

    from cachefit.cli import main

    art = tmp_path / "alone" / "build"
    shutil.copytree(mlp[1], art)
    res = CliRunner().invoke(main, ["bench", str(art), "--requests", "2"])
    assert res.exit_code == 2 and "--model" in res.output


def test_run_while_workers_are_running_goes_through_them(tmp_path_factory):
    """``Pipeline.run`` during pipelined use must not call the stage VMs from a second thread: it
    routes the request through the workers, and the answer equals the sequential one."""
    import numpy as np

    from cachefit.compiler import compile_model
    from cachefit.models import export
    from cachefit.runtime import load

    d = tmp_path_factory.mktemp("run_while")
    art = compile_model(export("mlp-tiny", d / "m.onnx", layers=2, hidden=64, batch=4), target="llvm",
                        out_dir=d / "art", cache="1GB", strategy="balanced", devices=2).artifact_dir
    pipe = load(art)
    x = {"x": np.random.default_rng(0).standard_normal((4, 64)).astype("float32")}
    want = pipe.run(x)["y"]
    with pipe:
        futures = [pipe.submit(x) for _ in range(8)]
        got = pipe.run(x)["y"]
        assert pipe._runner is not None and not pipe._runner.closed
        rest = [f.result(timeout=60)["y"] for f in futures]
    np.testing.assert_array_equal(got, want)
    for r in rest:
        np.testing.assert_array_equal(r, want)


def test_check_request_keeps_a_scalar_input_0d_and_makes_strided_ones_contiguous():
    """A 0-d input (a scalar the model takes, e.g. a temperature) reaches the stage as 0-d (it
    was made (1,) before, which the VM rejects); a strided batched input becomes contiguous."""
    from cachefit.runtime.pipelined import BatchLayout, check_request

    descs = [{"name": "x", "shape": [2, 3], "dtype": "float32"}, {"name": "t", "shape": [], "dtype": "float32"}]
    layout = BatchLayout(rows=2, batched_inputs=(True, False), batched_outputs=(True,))
    x = np.arange(12, dtype="float32").reshape(2, 6)[:, ::2]
    arrays, rows = check_request({"x": x, "t": np.float32(0.5)}, descs, layout)
    assert rows == 2 and arrays[1].shape == () and arrays[1] == np.float32(0.5)
    assert arrays[0].flags.c_contiguous and np.array_equal(arrays[0], x)
