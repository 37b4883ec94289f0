"""cachefit.codegen: compile each stage of a split module for its device and write the artifact."""

from .artifact import FORMAT, FORMAT_VERSION, build_artifact, compile_stage, extract_stage, make_target

__all__ = ["FORMAT", "FORMAT_VERSION", "build_artifact", "compile_stage", "extract_stage", "make_target"]
