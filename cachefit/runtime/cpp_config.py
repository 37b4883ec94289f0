"""Where the C++ runtime's build inputs are: its sources and CMake package, and the apache-tvm wheel's
TVM runtime and tvm-ffi headers and libraries (what ``cachefit config`` prints).

Nothing is imported from TVM (``importlib.util.find_spec`` only), so this is fast.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CachefitError

CPP_DIR = Path(__file__).resolve().parent / "cpp"


def _package_dir(name: str, dist: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CachefitError(f"the Python package {name!r} is not installed in {sys.executable}; "
                            f"the C++ runtime builds against it: pip install {dist}")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


@dataclass(frozen=True)
class CppBuildConfig:
    """Paths a C++ build of the cachefit runtime needs.

    source_dir:          cachefit/runtime/cpp (cachefit_runtime.h/.cc, CMakeLists.txt, cachefit-run)
    cmake_dir:           the folder of cachefit-config.cmake (``find_package(cachefit)``)
    tvm_lib_dir:         the folder of libtvm_runtime.so (and libtvm_runtime_cuda.so)
    tvm_ffi_include_dir: tvm-ffi's headers (tvm/ffi/*.h and dlpack/dlpack.h)
    tvm_ffi_lib_dir:     the folder of libtvm_ffi.so
    """

    source_dir: Path
    cmake_dir: Path
    tvm_lib_dir: Path
    tvm_ffi_include_dir: Path
    tvm_ffi_lib_dir: Path

    @property
    def cmake_prefix(self) -> Path:
        """A CMAKE_PREFIX_PATH entry under which ``find_package(cachefit)`` finds ``cmake/cachefit-config.cmake``."""
        return self.source_dir

    def cmake_args(self) -> list[str]:
        """``-D`` arguments for ``cmake`` (configure step): the package location and the TVM paths."""
        return [
            f"-Dcachefit_DIR={self.cmake_dir}",
            f"-DCACHEFIT_TVM_LIB_DIR={self.tvm_lib_dir}",
            f"-DCACHEFIT_TVM_FFI_INCLUDE_DIR={self.tvm_ffi_include_dir}",
            f"-DCACHEFIT_TVM_FFI_LIB_DIR={self.tvm_ffi_lib_dir}",
        ]

    def to_dict(self) -> dict:
        return {
            "source_dir": str(self.source_dir),
            "cmake_prefix": str(self.cmake_prefix),
            "cmake_dir": str(self.cmake_dir),
            "tvm_lib_dir": str(self.tvm_lib_dir),
            "tvm_ffi_include_dir": str(self.tvm_ffi_include_dir),
            "tvm_ffi_lib_dir": str(self.tvm_ffi_lib_dir),
            "cmake_args": self.cmake_args(),
        }

    def format_table(self) -> str:
        d = self.to_dict()
        rows = [(k, v) for k, v in d.items() if k != "cmake_args"]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:{width}}  {v}" for k, v in rows]
        lines.append(f"{'cmake_args':{width}}  {' '.join(d['cmake_args'])}")
        return "\n".join(lines)


def cpp_build_config() -> CppBuildConfig:
    """Locate the C++ runtime's sources and the apache-tvm wheel's libraries and headers.

    ``TVM_LIBRARY_PATH`` (a folder holding libtvm_runtime.so), when set, wins over the wheel's ``tvm/lib``.
    Raises :class:`CachefitError` naming the missing piece.
    """
    cmake_dir = CPP_DIR / "cmake"
    if not (cmake_dir / "cachefit-config.cmake").is_file() or not (CPP_DIR / "cachefit_runtime.cc").is_file():
        raise CachefitError(f"the C++ runtime sources are missing from {CPP_DIR}; reinstall cachefit")

    tvm_lib = None
    env = os.environ.get("TVM_LIBRARY_PATH")
    if env and (Path(env) / "libtvm_runtime.so").is_file():
        tvm_lib = Path(env).resolve()
    else:
        tvm_pkg = _package_dir("tvm", "apache-tvm==0.27.*")
        for cand in (tvm_pkg / "lib", tvm_pkg):
            if (cand / "libtvm_runtime.so").is_file():
                tvm_lib = cand
                break
        if tvm_lib is None:
            raise CachefitError(f"libtvm_runtime.so is not in {tvm_pkg / 'lib'}; reinstall apache-tvm, or set "
                                "TVM_LIBRARY_PATH to the folder that holds it")

    ffi_pkg = _package_dir("tvm_ffi", "apache-tvm-ffi")
    ffi_include = ffi_pkg / "include"
    if not (ffi_include / "tvm" / "ffi" / "function.h").is_file() or not (ffi_include / "dlpack" / "dlpack.h").is_file():
        raise CachefitError(f"tvm-ffi's C++ headers are not in {ffi_include}; reinstall apache-tvm-ffi")
    ffi_lib = ffi_pkg / "lib"
    if not (ffi_lib / "libtvm_ffi.so").is_file():
        raise CachefitError(f"libtvm_ffi.so is not in {ffi_lib}; reinstall apache-tvm-ffi")
    return CppBuildConfig(source_dir=CPP_DIR, cmake_dir=cmake_dir, tvm_lib_dir=tvm_lib,
                          tvm_ffi_include_dir=ffi_include, tvm_ffi_lib_dir=ffi_lib)
