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
@click.option("--overlap-transfers", is_flag=True, help="Hide stage-to-stage transfers behind compute.")
@click.option("--records", type=click.Choice(["ir", "analytic"]), default="ir", show_default=True,
              help="Layer figures from the Relax IR, or counted by hand from a cachefit reference model's shapes.")
@click.option("--dense-moe", is_flag=True,
              help="With --records analytic: every expert computes every token (as the ONNX graph does).")
@click.option("--fused-attention", is_flag=True,
              help="With --records analytic: attention as one fused kernel (scores never written).")
@user_errors
def estimate_cmd(model, hardware, devices, compare, fmt, input_shapes, batch, dtype, layers, micro_batch,
                 in_flight, usable_fraction, weight_bits, compute_efficiency, bandwidth_efficiency, link_bw,
                 overlap_transfers, records, dense_moe, fused_attention) -> None:
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


if __name__ == "__main__":  # pragma: no cover
    main()
