"""cachefit.runtime: load a compiled artifact directory and run its stages (numpy + tvm.runtime only)."""

from .loader import Pipeline, Stage, load, read_manifest, verify_files
from .weights import load_weights, save_weights

__all__ = ["Pipeline", "Stage", "load", "read_manifest", "verify_files", "load_weights", "save_weights"]
