"""The ``cachefit`` command: parses arguments and calls the library (tvmc-style subcommands)."""

from __future__ import annotations

import functools
import logging
import sys

import click

from .errors import CachefitError


def user_errors(fn):
    """Turn cachefit's own errors into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CachefitError as exc:
            click.echo(f"cachefit: error: {exc}", err=True)
            sys.exit(2)

    return wrapper


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="cachefit")
def main(verbose: int) -> None:
    """cachefit: split a model into per-device stages that run out of on-chip memory."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# --- cost model: estimate, calibrate (cachefit.perf) ------------------------------------------------


@main.command("estimate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--hardware", default="h100", show_default=True,
              help="Device preset (h100, h200, a100, cpu) or a hardware .json file.")
@click.option("--devices", type=int, default=16, show_default=True, help="Devices for cachefit's plan.")
@click.option("--compare", default="tp8pp2,pp16", show_default=True,
              help="Baselines, comma-separated: tp<T>pp<P> (tensor x pipeline), pp<K> (even pipeline split).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--input-shapes", default=None, help='Input shapes, e.g. "x:[8,256]".')
@click.option("--batch", type=int, default=None, help="Batch size to analyse the model at.")
@click.option("--dtype", default=None, help="Planning dtype for weights and activations (e.g. bfloat16).")
@click.option("--layers", type=int, default=None, help="Merge the discovered layers into N.")
@click.option("--micro-batch", type=int, default=None,
              help="Samples per micro-batch for every plan (default: the model's batch), one in flight per stage.")
@click.option("--in-flight", type=int, default=None,
              help="Samples in flight in total, the same for every plan, split into one micro-batch per stage.")
@click.option("--usable-fraction", type=float, default=None,
              help="Usable part of the on-chip memory (e.g. 0.7 for ~35 MB of an H100's 50 MB L2).")
@click.option("--weight-bits", type=click.Choice(["4", "8", "16", "32"]), default=None,
              help="Evaluate as if the weights were stored at this many bits (weight-only quantization).")
@click.option("--compute-efficiency", type=float, default=1.0, show_default=True,
              help="Fraction of peak FLOP/s the kernels reach.")
@click.option("--bandwidth-efficiency", type=float, default=1.0, show_default=True,
              help="Fraction of the nominal bandwidths reached (memory and link).")
@click.option("--link-bw", default=None, help="Override the link bandwidth, e.g. 450GB (per second).")
@click.option("--overlap-transfers", is_flag=True,
              help="Hide each stage's input transfer behind its compute, the first stage's input from the host "
                   "included: a stage takes max(layers, transfer).")
@click.option("--overlap-allreduce", is_flag=True,
              help="Hide the baselines' tensor-parallel all-reduces behind compute (best case).")
@click.option("--records", type=click.Choice(["ir", "analytic"]), default="ir", show_default=True,
              help="Layer figures from the Relax IR, or counted by hand from a cachefit reference model's shapes.")
@click.option("--dense-moe", is_flag=True,
              help="With --records analytic: every expert computes every token (as the ONNX graph does).")
@click.option("--fused-attention", is_flag=True,
              help="With --records analytic: attention as one fused kernel (scores never written).")
@user_errors
def estimate_cmd(model, hardware, devices, compare, fmt, input_shapes, batch, dtype, layers, micro_batch,
                 in_flight, usable_fraction, weight_bits, compute_efficiency, bandwidth_efficiency, link_bw,
                 overlap_transfers, overlap_allreduce, records, dense_moe, fused_attention) -> None:
    """Predict tokens/s and time per output token of cachefit's plan and of baselines."""
    import dataclasses
    import json

    from .perf.estimate import estimate_model
    from .perf.hardware import get_hardware, parse_size

    hw = get_hardware(hardware)
    if link_bw is not None:
        hw = dataclasses.replace(hw, link_bw=float(parse_size(link_bw.upper().removesuffix("/S"))))
    report = estimate_model(
        model, input_shapes=input_shapes, batch=batch, dtype=dtype, layers=layers, records=records,
        sparse_moe=not dense_moe, fused_attention=fused_attention, hardware=hw, devices=devices,
        compare=compare, micro_batch=micro_batch, in_flight=in_flight, usable_fraction=usable_fraction,
        weight_bits=int(weight_bits) if weight_bits else None, compute_efficiency=compute_efficiency,
        bandwidth_efficiency=bandwidth_efficiency, overlap_transfers=overlap_transfers,
        overlap_allreduce=overlap_allreduce,
    )
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format_table())


@main.command("calibrate")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Where to store the preset (default: ~/.cache/cachefit/cpu.json, read by --hardware cpu).")
@click.option("--method", type=click.Choice(["tvm", "numpy"]), default="tvm", show_default=True,
              help="Time kernels compiled by TVM (what cachefit's CPU stages run) or numpy's.")
@click.option("--quick", is_flag=True, help="Fewer sizes and repeats (a few seconds).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@user_errors
def calibrate_cmd(output, method, quick, fmt) -> None:
    """Measure this CPU (one core) and store it as the `cpu` hardware preset."""
    import json

    from .perf.calibrate import calibrate, format_calibration

    hw, path, measurements = calibrate(output, method=method, quick=quick)
    if fmt == "json":
        click.echo(json.dumps({"path": str(path), "hardware": hw.to_dict(), "measurements": measurements}, indent=2))
    else:
        click.echo(format_calibration(hw, measurements))
        click.echo(f"stored in {path}")


# --- shared options --------------------------------------------------------------------------

def model_options(fn):
    """Options that say how to read the model: shapes, batch, planning dtype, layer grouping."""
    opts = [
        click.option("--input-shapes", default=None, help='Static input shapes, tvmc-style: "x:[8,256] mask:[8,1]".'),
        click.option("--batch", type=int, default=None, help="Set the leading (batch) dimension of every input."),
        click.option("--dtype", default=None, help="Plan as if every float tensor had this dtype (e.g. bf16)."),
        click.option("--layers", "num_layers", type=int, default=None, help="Merge the discovered layers into N."),
        click.option("--layer-boundaries", default=None,
                     help="Comma-separated node names where layers start (overrides discovery)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def capacity_options(fn):
    opts = [
        click.option("--cache", default=None, help="On-chip capacity per device, with a unit: 50MB, 2MiB, 40000KB."),
        click.option("--hardware", default=None, help="Device preset: h100 (default), h200, a100, cpu."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def plan_options(fn):
    opts = [
        click.option("--strategy", default="greedy", show_default=True,
                     type=click.Choice(["greedy", "balanced", "balanced-reference", "min-time", "layout"]),
                     help="Partitioning strategy."),
        click.option("--devices", type=int, default=None, help="Number of devices (default: the fewest that fit)."),
        click.option("--footprint", default="exact", type=click.Choice(["exact", "sum"]), show_default=True,
                     help="Group footprint: exact (shared weights once, peak working set) or the additive sum."),
        click.option("--layout", default=None, help="Explicit layout: layers per device (4,4,4,4) or stage-start layer names."),
        click.option("--allow-spill", is_flag=True, help="Place a layer that fits no device alone, spilling off chip."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _boundaries(text):
    return [b.strip() for b in text.split(",") if b.strip()] if text else None


# --- plan -------------------------------------------------------------------------------------

# --- demo -------------------------------------------------------------------------------------

@main.command()
@click.option("--model", "preset", default="dense-tiny", show_default=True, help="Bundled reference model preset.")
@click.option("--cache", default="2MB", show_default=True, help="On-chip capacity per (CPU) device.")
@click.option("-o", "--output", default="build/demo", show_default=True, type=click.Path(file_okay=False))
@user_errors
def demo(preset, cache, output):
    """The main job on a bundled model: export, plan, compile into CPU stages, run, compare with onnxruntime."""
    from .demo import run_demo

    ok = run_demo(preset=preset, cache=cache, out_dir=output, echo=click.echo)
    sys.exit(0 if ok else 1)


# --- models -----------------------------------------------------------------------------------

@main.group()
def models():
    """Reference models (dense transformer, MoE, MLP chain) written as ONNX."""


@models.command("list")
def models_list():
    """List the presets."""
    from .models import PRESETS

    for name, params in PRESETS.items():
        click.echo(f"{name:18s} " + " ".join(f"{k}={v}" for k, v in params.items()))


@models.command("export")
@click.argument("name")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
@click.option("--layers", type=int, default=None)
@click.option("--hidden", type=int, default=None)
@click.option("--heads", type=int, default=None)
@click.option("--ffn", type=int, default=None)
@click.option("--seq", type=int, default=None)
@click.option("--batch", type=int, default=None)
@click.option("--experts", type=int, default=None)
@click.option("--top-k", "top_k", type=int, default=None)
@click.option("--vocab", type=int, default=None)
@click.option("--dtype", default=None)
@click.option("--seed", type=int, default=None)
@click.option("--init", type=click.Choice(["default", "gpt2"]), default=None,
              help="Weights: default N(0, 1/sqrt(fan_in)); gpt2 N(0, 0.02), residual projections / sqrt(2 * layers).")
@click.option("--shape-only", is_flag=True, default=None, help="Declare the weights as external data, never written.")
@user_errors
def models_export(name, output, **overrides):
    """Write the reference model NAME (a preset, or a family: dense, moe, mlp) to an ONNX file."""
    from .models import export

    overrides = {k: v for k, v in overrides.items() if v is not None}
    path = export(name, output, **overrides)
    click.echo(f"wrote {path}")


def fit_options(fn):
    """Options that make oversized layers fit (cachefit.fit), shared by plan and compile: every one of
    them changes the footprints, so plan reports the bytes compile plans with."""
    opts = [
        click.option("--quantize", type=click.Choice(["none", "int8", "int4"]), default=None,
                     help="Weight-only quantization of every matmul/conv weight (default: none)."),
        click.option("--group-size", type=int, default=None,
                     help="Rows of the reduction axis per scale (e.g. 128); default: one scale per output channel."),
        click.option("--prune", type=float, default=0.0, show_default=True,
                     help="Fraction of every MLP's hidden units to remove (by L2 norm)."),
        click.option("--prune-heads", type=float, default=0.0, show_default=True,
                     help="Fraction of every attention's heads (key/value groups under GQA) to remove, by the L2 "
                          "norms of their Q/K/V/O weights; rounded to whole heads per layer (the report gives "
                          "the fraction applied)."),
        click.option("--int8-weights", multiple=True,
                     help="Where INT4 is applied (--quantize int4, --fit auto), keep these weights at INT8: "
                          "fnmatch patterns on the IR weight names ('*router*') or @LAYER ('@head'); repeatable."),
        click.option("--fit", type=click.Choice(["auto", "none"]), default=None,
                     help="auto: per layer over capacity apply INT8, INT4, INT4 + MLP pruning (5% steps up to "
                          "--max-prune), then INT4 + that + head pruning (one whole head at a time up to "
                          "--max-prune-heads), then a smaller micro-batch; none: only report what would help."),
        click.option("--max-prune", type=float, default=0.5, show_default=True,
                     help="The most --fit auto may prune of a layer's MLP hidden units."),
        click.option("--max-prune-heads", type=float, default=None,
                     help="The most --fit auto may prune of a layer's attention heads (whole heads, or whole "
                          "key/value groups under GQA, rounded down); tried only once MLP pruning reached "
                          "--max-prune, and only in layers with attention. Default: --max-prune's value; "
                          "0 keeps every head."),
        click.option("--micro-batch", default=None,
                     help="auto (largest divisor of the batch whose working set fits) or N; the runtime "
                          "splits the batch and joins the outputs."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def calibrate_option(fn):
    """--calibrate (compile only: it changes weight values, not bytes; plan refuses it with the reason)."""
    return click.option("--calibrate", type=int, default=None,
                        help="Quantize with GPTQ, calibrated on N random input batches run through the float "
                             "model (default: data-free round to nearest).")(fn)


def _fit_kwargs(quantize=None, group_size=None, prune=0.0, fit=None, max_prune=0.5, micro_batch=None,
                prune_heads=0.0, max_prune_heads=None, int8_weights=(), calibrate=None) -> dict:
    """The fit options as compile_model / fit_and_plan take them."""
    if micro_batch is not None and str(micro_batch).strip().lower() != "auto":
        try:
            micro_batch = int(micro_batch)
        except ValueError:
            raise CachefitError(f"--micro-batch {micro_batch!r}: use auto or a positive integer") from None
        if micro_batch < 1:
            raise CachefitError(f"--micro-batch {micro_batch}: use auto or a positive integer")
    elif micro_batch is not None:
        micro_batch = "auto"
    return dict(quantize=quantize, group_size=group_size, prune=prune, fit=fit, max_prune=max_prune,
                micro_batch=micro_batch, prune_heads=prune_heads, max_prune_heads=max_prune_heads,
                quantize_int8_weights=list(int8_weights) or None, quantize_calibration=calibrate)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@model_options
@capacity_options
@plan_options
@click.option("--format", "fmt", default="table", type=click.Choice(["table", "json"]), show_default=True)
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="Write a memory map (PNG) of the plan.")
@fit_options
@click.option("--calibrate", type=int, default=None, hidden=True)  # refused with the reason (see fit_and_plan)
@user_errors
def plan(model, input_shapes, batch, dtype, num_layers, layer_boundaries, cache, hardware, strategy, devices,
         footprint, layout, allow_spill, fmt, plot, **fit_opts):
    """Per-layer footprints of MODEL.onnx and a partition over devices.

    The fit options are compile's, applied the same way, so the bytes are the ones compile plans
    with. compile's --calibrate is not taken: GPTQ calibration changes the rounded weight values,
    not a byte of any footprint."""
    import json

    from .fit import fit_and_plan

    report = fit_and_plan(model, input_shapes=input_shapes, batch=batch, dtype=dtype, cache=cache, hardware=hardware,
                          strategy=strategy, devices=devices, footprint=footprint, layout=layout,
                          allow_spill=allow_spill, layers=num_layers, layer_boundaries=_boundaries(layer_boundaries),
                          **_fit_kwargs(**fit_opts))
    if plot:
        from .perf.plot import plot_plan

        plot_plan(report.plan, plot)
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.format_table())


@main.command("compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--target", type=click.Choice(["llvm", "cuda"]), default="llvm", show_default=True,
              help="llvm: one CPU library per stage; cuda: one GPU library per stage (needs nvcc).")
@click.option("--arch", default="sm_90a", show_default=True, help="CUDA architecture of the device code.")
@model_options
@capacity_options
@plan_options
@click.option("--threads", type=int, default=None, help="CPU threads per stage (llvm).")
@click.option("--mcpu", default=None,
              help="LLVM CPU of the llvm stages, e.g. x86-64-v3, skylake-avx512 (default: this host's CPU).")
@click.option("--tuning-records", type=click.Path(exists=False), default=None,
              help="Tuned kernel tiles (work directory of cachefit.codegen.cpu_tuning.tune_relax) or a "
                   "meta-schedule database; kernels they do not cover keep the default schedules.")
@click.option("-o", "--output", "out_dir", default="build", show_default=True, type=click.Path(file_okay=False),
              help="Artifact directory to write.")
@fit_options
@calibrate_option
@user_errors
def compile_cmd(model, target, arch, input_shapes, batch, dtype, num_layers, layer_boundaries, cache, hardware,
                strategy, devices, footprint, layout, allow_spill, threads, mcpu, tuning_records, out_dir, **fit_opts):
    """Compile MODEL.onnx into one library per device plus manifest.json (see docs/artifact-format.md)."""
    from .compiler import compile_model

    if dtype:
        raise CachefitError("--dtype only changes how a model is planned (cachefit plan); compile uses the model's "
                            "own dtypes: leave --dtype out")
    result = compile_model(model, target=target, arch=arch, out_dir=out_dir, input_shapes=input_shapes, batch=batch,
                           cache=cache, hardware=hardware, strategy=strategy, devices=devices, footprint=footprint,
                           layout=layout, allow_spill=allow_spill, layers=num_layers,
                           layer_boundaries=_boundaries(layer_boundaries), threads=threads, mcpu=mcpu,
                           tuning_records=tuning_records, progress=lambda line: click.echo(line, err=True),
                           **_fit_kwargs(**fit_opts))
    if result.fit is not None:
        click.echo(result.fit.format_table())
    click.echo(result.report.plan.format_table())
    click.echo(f"wrote {result.artifact_dir}")


@main.command("run")
@click.argument("artifact", type=click.Path(exists=False, file_okay=False))
@click.option("-i", "--inputs", "inputs_path", type=click.Path(dir_okay=False), default=None,
              help="Inputs as an .npz file (one array per input name); default: generated (--fill-mode).")
@click.option("-o", "--outputs", "outputs_path", type=click.Path(dir_okay=False), default=None,
              help="Write the outputs to this .npz file.")
@click.option("--fill-mode", type=click.Choice(["random", "zeros", "ones"]), default="random", show_default=True,
              help="How to generate inputs when no -i is given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--devices", "devices", default=None,
              help="Comma-separated device per stage (cpu, cuda:0, ...), or one for all stages.")
@click.option("--print-time", is_flag=True, help="Print per-stage and total run times.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Runs to time (with --print-time).")
@click.option("--print-outputs/--no-print-outputs", default=True, show_default=True,
              help="Print each output's shape, dtype and a few values.")
@click.option("--timeline", "timeline_path", type=click.Path(dir_okay=False), default=None,
              help="Also run the inputs --repeat times through the pipelined runtime (one worker per stage) and "
                   "draw its timeline to this PNG (needs matplotlib), with per-stage accounting.")
@user_errors
def run_cmd(artifact, inputs_path, outputs_path, fill_mode, seed, devices, print_time, repeat, print_outputs,
            timeline_path):
    """Run a compiled artifact directory (from ``cachefit compile``) on its devices."""
    import numpy as np

    from .runtime import load
    from .runtime.tools import format_times, make_inputs, read_inputs, time_pipeline

    devs = None
    if devices:
        parts = [d.strip() for d in devices.split(",") if d.strip()]
        devs = parts[0] if len(parts) == 1 else parts
    pipe = load(artifact, devices=devs)
    inputs = read_inputs(inputs_path) if inputs_path else make_inputs(pipe.inputs, fill_mode, seed)
    outputs = pipe.run(inputs)
    if outputs_path:
        np.savez(outputs_path, **outputs)
    if print_outputs:
        for name, arr in outputs.items():
            flat = arr.reshape(-1)[:6]
            click.echo(f"{name}: {arr.dtype}{list(arr.shape)} [{', '.join(f'{v:.6g}' for v in flat.tolist())}"
                       f"{', ...' if arr.size > 6 else ''}]")
    if print_time:
        times = time_pipeline(pipe, inputs, repeat)
        click.echo(format_times(times, [s.name for s in pipe.stages]))
    if timeline_path:
        from .runtime.pipelined import run_timeline

        click.echo(run_timeline(pipe, inputs, timeline_path, repeat=repeat).format_table())
        click.echo(f"wrote {timeline_path}")


@main.command("inspect")
@click.argument("artifact", type=click.Path(exists=False, file_okay=False))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@user_errors
def inspect_cmd(artifact, fmt):
    """Show the plan and the stages of a compiled artifact directory (from its manifest)."""
    import json

    from .runtime import read_manifest
    from .runtime.tools import format_manifest

    manifest = read_manifest(artifact)
    click.echo(json.dumps(manifest, indent=2) if fmt == "json" else format_manifest(manifest))


# --- config: build inputs of the C++ runtime (cachefit/runtime/cpp) ------------------------------

@main.command("config")
@click.option("--cmake-prefix", "what", flag_value="cmake-prefix",
              help="Print the CMAKE_PREFIX_PATH entry for find_package(cachefit).")
@click.option("--cmake-args", "what", flag_value="cmake-args",
              help="Print the -D arguments for cmake: cachefit_DIR and the apache-tvm wheel's TVM paths.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@user_errors
def config_cmd(what, fmt):
    """Where the C++ runtime's sources and the TVM headers and libraries it builds against are."""
    import json

    from .runtime.cpp_config import cpp_build_config

    cfg = cpp_build_config()
    if what == "cmake-prefix":
        click.echo(str(cfg.cmake_prefix))
    elif what == "cmake-args":
        click.echo(" ".join(cfg.cmake_args()))
    elif fmt == "json":
        click.echo(json.dumps(cfg.to_dict(), indent=2))
    else:
        click.echo(cfg.format_table())


@main.command("bench")
@click.argument("artifact", type=click.Path(exists=False, file_okay=False))
@click.option("--batch", type=int, default=None, help="Rows per request (default: the model's batch).")
@click.option("--micro-batch", type=int, default=None,
              help="Rows per micro-batch through the pipeline, a multiple of the compiled batch (default: it).")
@click.option("--requests", type=int, default=200, show_default=True, help="Requests per throughput run.")
@click.option("--model", type=click.Path(dir_okay=False), default=None,
              help="The ONNX file the artifact was compiled from (default: found by its sha256 next to the artifact).")
@click.option("--cores", default="auto", show_default=True,
              help="Cores per stage: auto, none, or groups like '0;1' / '0-1;2-3'.")
@click.option("--rounds", type=int, default=1, show_default=True, help="Interleaved rounds; the best is reported.")
@click.option("--latency-requests", type=int, default=None, help="Requests of the one-at-a-time latency run.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Compare with the model unpartitioned on one core.")
@click.option("--onnxruntime/--no-onnxruntime", "use_ort", default=True, show_default=True,
              help="Compare with onnxruntime using the pipeline's total thread count.")
@click.option("--baseline-dir", type=click.Path(file_okay=False), default=None,
              help="Keep (and reuse) the unpartitioned build here (default: a temporary directory).")
@click.option("--timeline", "timeline_path", type=click.Path(dir_okay=False), default=None,
              help="Draw a timeline of 20 pipelined requests to this PNG.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@user_errors
def bench_cmd(artifact, batch, micro_batch, requests, model, cores, rounds, latency_requests, baseline, use_ort,
              baseline_dir, timeline_path, fmt):
    """Throughput, latency and per-stage utilisation of ARTIFACT run as a pipeline, against the same model
    unpartitioned on one core and onnxruntime."""
    import json

    from .bench import bench_artifact

    report = bench_artifact(artifact, batch=batch, micro_batch=micro_batch, requests=requests, model=model,
                            cores=cores, rounds=rounds, latency_requests=latency_requests, baseline=baseline,
                            onnxruntime=use_ort, baseline_dir=baseline_dir, timeline=timeline_path,
                            progress=lambda line: click.echo(line, err=True))
    click.echo(json.dumps(report.to_dict(), indent=2) if fmt == "json" else report.format_table())


if __name__ == "__main__":  # pragma: no cover
    main()
