"""cachefit.codegen: compile each stage of a split module for its device and write the artifact."""

from .artifact import ENTRY, FORMAT, FORMAT_VERSION, build_artifact, compile_stage, extract_stage, make_target, prepare_stage

__all__ = ["ENTRY", "prepare_stage", "FORMAT", "FORMAT_VERSION", "build_artifact", "compile_stage", "extract_stage", "make_target"]
