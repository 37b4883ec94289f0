"""CUDA toolchain for stage builds: find nvcc, load TVM's CUDA runtime, compile device code to a fatbin.

On a build host without a GPU driver, TVM's ``libtvm_runtime_cuda.so`` cannot load (it links
``libcuda.so.1``), and a CUDA build then keeps CUDA source instead of device code. We load a small
driver stub (a C library exporting the few ``cu*`` entry points the runtime links, each returning an
error) first, so TVM's CUDA runtime loads and the build packs the fatbin that nvcc produced. The stub
is only loaded when the real driver is absent; it is never called during a build.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import CachefitError

logger = logging.getLogger(__name__)

FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")
EM_CUDA = 190
DEFAULT_NVCC = "/usr/local/cuda/bin/nvcc"

# Driver entry points libtvm_runtime_cuda.so links (nm -D --undefined-only); each returns
# CUDA_ERROR_NO_DEVICE (100) in the stub.
_DRIVER_SYMBOLS = (
    "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
    "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled",
    "cuInit", "cuDeviceGet", "cuDeviceGetCount", "cuCtxGetCurrent",
)


class CudaToolchainError(CachefitError):
    """No usable CUDA toolkit (nvcc) or host compiler for a ``--target cuda`` build."""


def find_nvcc() -> str:
    """The nvcc to use: ``$CUDA_HOME/bin/nvcc``, ``nvcc`` on PATH, or ``/usr/local/cuda/bin/nvcc``."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    candidates.append(Path(DEFAULT_NVCC))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise CudaToolchainError(
        "--target cuda needs the CUDA toolkit to compile device code, but no nvcc was found "
        f"(looked in $CUDA_HOME/bin, PATH and /usr/local/cuda/bin); install the CUDA toolkit or set "
        "CUDA_HOME, or compile for CPU with --target llvm"
    )


def _arch_number(arch: str) -> str:
    a = str(arch).strip().lower()
    if not a.startswith("sm_") or not a[3:].rstrip("af").isdigit():
        raise CachefitError(f"malformed CUDA arch {arch!r}: expected sm_XY, e.g. sm_90a, sm_80, sm_89")
    return a[3:]


def _stub_source() -> str:
    lines = ["/* cachefit build-time stand-in for libcuda.so.1: every entry point reports no device. */"]
    lines += [f"int {name}(void) {{ return 100; }}" for name in _DRIVER_SYMBOLS]
    return "\n".join(lines) + "\n"


def _cache_dir() -> Path:
    base = os.environ.get("CACHEFIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cachefit"
    )
    return Path(base)


def build_driver_stub() -> Path:
    """Compile (once, cached) the driver stub library ``libcuda.so.1``; returns its path."""
    src = _stub_source()
    key = hashlib.sha256(src.encode()).hexdigest()[:16]
    out_dir = _cache_dir() / f"cuda-stub-{key}"
    lib = out_dir / "libcuda.so.1"
    if lib.is_file():
        return lib
    cc = shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        raise CudaToolchainError("building for CUDA without a GPU driver needs a C compiler (gcc, cc or clang) "
                                 "on PATH to make a driver stub; install gcc")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        c_file = Path(tmp) / "stub.c"
        c_file.write_text(src)
        tmp_lib = Path(tmp) / "libcuda.so.1"
        proc = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o", str(tmp_lib), str(c_file)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise CudaToolchainError(f"could not build the CUDA driver stub with {cc}: {proc.stderr.strip()}")
        os.replace(tmp_lib, lib)
    return lib


def ensure_cuda_runtime() -> None:
    """Make sure TVM's CUDA runtime is loaded (with the real driver, or the stub when there is none)."""
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        logger.info("using the installed CUDA driver library")
    except OSError:
        stub = build_driver_stub()
        logger.info("no CUDA driver on this host: loading the build-time driver stub %s", stub)
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    from tvm_ffi.libinfo import load_lib_ctypes

    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, FileNotFoundError, RuntimeError) as exc:
        raise CudaToolchainError(
            f"TVM's CUDA runtime (libtvm_runtime_cuda.so) could not be loaded: {exc}; a CUDA build needs it to "
            "pack device code. Check that the CUDA runtime library (libcudart) of the toolkit is installed"
        ) from exc


def nvcc_fatbin(code: str, arch: str, nvcc: str | None = None) -> bytes:
    """Compile CUDA C source to a fatbin holding SASS for ``arch`` (``sm_90a``)."""
    nvcc = nvcc or find_nvcc()
    num = _arch_number(arch)
    with tempfile.TemporaryDirectory(prefix="cachefit-nvcc-") as tmp:
        src = Path(tmp) / "kernels.cu"
        out = Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        cmd = [
            nvcc, "--fatbin", "-O3", "-gencode", f"arch=compute_{num},code=sm_{num}",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
            "--expt-relaxed-constexpr", "--expt-extended-lambda", "-w",
            "-o", str(out), str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise CudaToolchainError(f"nvcc failed to compile the generated kernels for {arch}:\n{proc.stdout}{proc.stderr}")
        data = out.read_bytes()
    if not data.startswith(FATBIN_MAGIC):
        raise CudaToolchainError(f"nvcc produced no fatbin for {arch} (unexpected magic {data[:4].hex()})")
    return data


@contextlib.contextmanager
def nvcc_device_code(arch: str):
    """Within the block, TVM's CUDA codegen compiles kernels with nvcc into a fatbin for ``arch``."""
    import tvm_ffi

    nvcc = find_nvcc()
    _arch_number(arch)
    ensure_cuda_runtime()
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_callback(code, *_args):
        return bytearray(nvcc_fatbin(code, arch, nvcc))

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_callback, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def device_code_kinds(path: str | Path) -> dict:
    """What CUDA code a compiled library carries: ``{"fatbin": n, "cubin": n, "source": bool}``.

    ``fatbin`` counts fatbin headers (magic 0xBA55ED50), ``cubin`` embedded ELF images with machine
    ``EM_CUDA`` (190), ``source`` whether CUDA C kernels (``extern "C" __global__``) are embedded.
    """
    data = Path(path).read_bytes()
    fatbins = data.count(FATBIN_MAGIC)
    cubins = 0
    start = 0
    while True:
        i = data.find(b"\x7fELF", start)
        if i < 0:
            break
        if i > 0 and len(data) >= i + 20 and int.from_bytes(data[i + 18:i + 20], "little") == EM_CUDA:
            cubins += 1
        start = i + 4
    source = b'extern "C" __global__' in data
    return {"fatbin": fatbins, "cubin": cubins, "source": source}
