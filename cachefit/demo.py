"""``cachefit demo``: the whole method on a bundled reference model, end to end, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


def run_demo(preset: str = "dense-tiny", cache: str = "2MB", out_dir: str | Path = "build/demo",
             echo: Callable[[str], None] = print, seed: int = 0) -> bool:
    """Export ``preset``, plan it under ``cache`` per device, compile one CPU library per stage, run
    the pipeline on random inputs and compare with onnxruntime. Returns whether they agree."""
    from . import models
    from .compiler import compile_model, reference_outputs
    from .runtime import load

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = models.export(preset, out / f"{preset}.onnx")
    echo(f"1. exported the reference model {preset} to {model_path}")
    result = compile_model(model_path, target="llvm", out_dir=out / "artifact", cache=cache, strategy="balanced",
                           progress=lambda line: echo(f"   {line}"))
    echo("2. plan:")
    echo("\n".join("   " + line for line in result.report.format_table().splitlines()))
    echo(f"3. compiled {result.report.plan.devices_used} CPU stage(s) into {result.artifact_dir}")
    pipe = load(result.artifact_dir)
    rng = np.random.default_rng(seed)
    inputs = {}
    for d in pipe.inputs:
        if d["dtype"].startswith("int"):
            inputs[d["name"]] = rng.integers(0, 100, d["shape"]).astype(d["dtype"])
        else:
            inputs[d["name"]] = rng.standard_normal(d["shape"]).astype(d["dtype"])
    outs = pipe.run(inputs)
    ref = reference_outputs(model_path, inputs)
    ok = True
    echo("4. ran the pipeline; stage times: " + ", ".join(f"{t * 1e3:.2f} ms" for t in pipe.last_stage_seconds))
    for name, got in outs.items():
        want = ref[name]
        err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
        good = err <= 1e-4
        ok &= good
        echo(f"5. output {name!r} {list(got.shape)}: max error relative to the output's scale {err:.2e} "
             f"against onnxruntime -> {'MATCH' if good else 'MISMATCH'}")
    return ok
