"""CPU schedules for the fused TIR functions of a Relax module: cache-blocked, vectorised matmul kernels.

TVM 0.27's default LLVM pipeline schedules nothing (``tvm.s_tir.dlight.cpu`` has only GEMV and
reduction rules), so every kernel runs as the naive loop nest the legalizer wrote. This module holds
cachefit's own rules in the style of ``tvm.s_tir.dlight`` and the pass that applies them:

- :class:`GemmRule`: any function whose one reduction block is a multiply-accumulate
  (``C[.., i, j] += A(.., i, k) * B(.., k, j)``: matmul, dense, batched matmul, the GEMM of
  :func:`cachefit.codegen.cpu_legalize.conv2d_im2col`), with prologues inlined (weight transpose,
  dequantisation) and element-wise epilogues (bias, activation, residual add, batch-norm) computed on
  the register tile. Two micro-kernels:

  * *outer product* when ``B`` is contiguous along ``j``: an ``mr x (nr * lanes)`` accumulator tile
    held in vector registers over the whole ``k`` loop, ``B`` panels packed once per column block
    and reused by every row block, rows blocked so that ``A``'s block stays in L2;
  * *dot product* when every operand is contiguous along ``k`` (``x @ W.T``: ONNX ``Gemm`` with
    ``transB=1``, whose weights arrive untransposed at run time): ``mr x nr`` vector accumulators over
    ``k`` chunks, reduced across lanes once per tile.

- :class:`ReductionRule`: softmax / layer-norm / RMS-norm style functions (dlight's CPU reduction
  rule, parallel only when the stage owns several threads) and reductions over a non-innermost axis
  (pooling), vectorised along the innermost spatial axis.
- :class:`InjectiveRule`: everything else, block by block: parallel outer loops, vectorised inner loop.

Tile sizes come from :class:`CPUSpec`: vector width from the target's features, L1/L2 from sysfs.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm.sym
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

log = logging.getLogger(__name__)

# Accumulator registers a micro-kernel may use (AVX-512 and AVX2 both have 32 / 16 vector registers;
# keep a few for the B vectors and the broadcast of A).
_MAX_ACC = {512: 28, 256: 12, 128: 12}
# Below this many multiply-adds a kernel is not worth a parallel launch (thread-pool wake-up ~ 5 us).
_PARALLEL_MIN_WORK = 1 << 17
# Name prefix of the blocks written by cpu_legalize (their stages stay at the root of the function).
KEEP_PREFIX = "cachefit_"


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def _sysfs_cache_bytes(level: int, default: int) -> int:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            if (idx / "level").read_text().strip() != str(level):
                continue
            if (idx / "type").read_text().strip() not in ("Data", "Unified"):
                continue
            text = (idx / "size").read_text().strip().upper()
            mult = {"K": 1024, "M": 1024 * 1024, "G": 1024**3}.get(text[-1:], 1)
            return int(text.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return default


@dataclass(frozen=True)
class CPUSpec:
    """What the CPU rules size their tiles from.

    vector_bits: SIMD width the target may use (512 with AVX-512, 256 with AVX2, else 128).
    l1_bytes, l2_bytes: per-core data caches (sysfs of this machine unless given).
    threads: cores the stage owns; 1 emits no parallel loops.
    """

    vector_bits: int = 512
    l1_bytes: int = 48 * 1024
    l2_bytes: int = 2 * 1024 * 1024
    threads: int = 1

    def lanes(self, dtype: str) -> int:
        bits = tvm.runtime.DataType(dtype).bits
        return max(1, self.vector_bits // max(bits, 8))

    @property
    def max_acc(self) -> int:
        return _MAX_ACC.get(self.vector_bits, 12)

    @classmethod
    def for_target(cls, target: Target, threads: int | None = None) -> "CPUSpec":
        return cls(
            vector_bits=target_vector_bits(target),
            l1_bytes=_sysfs_cache_bytes(1, 32 * 1024),
            l2_bytes=_sysfs_cache_bytes(2, 1024 * 1024),
            threads=max(1, int(threads if threads is not None else (os.cpu_count() or 1))),
        )


def target_vector_bits(target: Target) -> int:
    """SIMD width of an llvm target, from its CPU features (AVX-512: 512, AVX2: 256, else 128)."""
    from tvm.target.codegen import llvm_cpu_has_features  # pylint: disable=import-outside-toplevel

    try:
        if llvm_cpu_has_features(["avx512f"], target):
            return 512
        if llvm_cpu_has_features(["avx2"], target):
            return 256
    except Exception:  # pylint: disable=broad-except
        log.debug("cannot query CPU features of %s", target)
    return 128


# ---------------------------------------------------------------------------------------------
# Small helpers on TIR
# ---------------------------------------------------------------------------------------------


def _int(x) -> int | None:
    return int(x) if isinstance(x, (int, tirx.IntImm)) else None


_TensorLoad = tvm.ir.TensorLoad  # tirx.BufferLoad builds these; the buffer is ``.source``


def _loads(expr) -> list:
    found: list = []
    tvm_ffi.structural_walk(expr, (_TensorLoad, found.append), order="post")
    return found


def _vars(expr) -> set:
    found: set = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, found.add), order="post")
    return found


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    return _int(sch.get(loop).extent)


def _prod(xs) -> int:
    return int(math.prod(xs)) if xs else 1


def _root_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _is_reduction(sch: s_tir.Schedule, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _loops_match_iters(sch: s_tir.Schedule, block) -> list | None:
    """The block's loops, one per block iter var in the same order, or None if not that simple."""
    loops = sch.get_loops(block)
    blk = sch.get(block)
    if len(loops) != len(blk.iter_vars):
        return None
    for loop, iv in zip(loops, blk.iter_vars):
        if _int(sch.get(loop).extent) != _int(iv.dom.extent) or _int(iv.dom.min) != 0:
            return None
    realize = sch.get_sref(block).stmt
    del realize
    return list(loops)


def _loop_binding(sch: s_tir.Schedule, block, iter_index: int):
    """The loop (of ``block``'s loop nest) whose variable the block iter ``iter_index`` is bound to."""
    name = sch.get(block).name_hint
    found = []

    def visit(node):
        if isinstance(node, s_tir.SBlockRealize) and node.block.name_hint == name:
            found.append(node)

    tvm_ffi.structural_walk(sch.mod["main"].body, visit, order="post")
    if len(found) != 1:
        return None
    used = _vars(found[0].iter_values[iter_index])
    for loop in sch.get_loops(block):
        if sch.get(loop).loop_var in used:
            return loop
    return None


def _reads_elementwise(sch: s_tir.Schedule, block, buffer) -> bool:
    """Whether ``block`` reads ``buffer`` only at ``[v0, v1, ...]``, its own iter vars in order.

    Only then may it be moved under a tile of the producer with ``reverse_compute_at``: with
    index arithmetic (a reshape fused into the epilogue) TVM relaxes the consumed region to a
    bounding box and computes elements whose inputs are not produced yet.
    """
    blk = sch.get(block)
    ivars = [iv.var for iv in blk.iter_vars]
    loads = [ld for ld in _loads(blk.body) if ld.source.same_as(buffer)]
    if not loads:
        return False
    for ld in loads:
        if len(ld.indices) != len(ivars):
            return False
        if not all(isinstance(ix, tirx.Var) and ix.same_as(v) for ix, v in zip(ld.indices, ivars)):
            return False
    return True


def _split_vec(sch: s_tir.Schedule, loop, lanes: int):
    """Vectorise ``loop`` (splitting off ``lanes`` when longer); returns the vectorised loop."""
    ext = _extent(sch, loop)
    if ext is None or ext <= 1:
        return None
    if ext <= lanes:
        sch.vectorize(loop)
        return loop
    if ext % lanes:
        # a predicated vector loop is scalarised by TVM: vectorise a divisor instead
        for cand in (lanes // 2, lanes // 4):
            if cand >= 4 and ext % cand == 0:
                lanes = cand
                break
        else:
            return None
    _, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    return inner


def _parallel_prefix(sch: s_tir.Schedule, loops: list, threads: int, work: int) -> None:
    """Fuse the shortest prefix of ``loops`` with at least ``threads`` iterations and run it parallel."""
    if threads <= 1 or work < _PARALLEL_MIN_WORK or not loops:
        return
    prefix, ext = [], 1
    for loop in loops:
        e = _extent(sch, loop)
        if e is None:
            break
        prefix.append(loop)
        ext *= e
        if ext >= 2 * threads:
            break
    if ext < threads:
        return
    fused = sch.fuse(*prefix) if len(prefix) > 1 else prefix[0]
    sch.parallel(fused)


# ---------------------------------------------------------------------------------------------
# Matmul-like blocks
# ---------------------------------------------------------------------------------------------


@dataclass
class GemmForm:
    """How a multiply-accumulate block maps onto a GEMM.

    kind: ``"nn"`` (outer product, B contiguous along j) or ``"nt"`` (dot product, contiguous along k).
    batch, i, j, k: positions of the block iter vars (``i`` may be None: one row).
    mfuse: batch positions that ``B`` does not read (``x[b, s, k] @ W[k, n]``): they are fused
           with ``i`` into one row loop, so that the weight panel serves all rows at once.
    b_buffers: buffers read along ``j`` (packing candidates for ``"nn"``).
    packed: columns per panel when ``B`` is read from pre-packed panels ``Bp[j // P, .., j % P]``
            (:class:`cachefit.codegen.prepack.PackMatmulWeights`), else 0.
    """

    kind: str
    batch: list
    i: int | None
    j: int
    k: list
    extents: list
    dtype: str
    b_buffers: list
    mfuse: list
    packed: int = 0
    packed_buffers: list = field(default_factory=list)

    @property
    def m(self) -> int:
        return _prod([self.extents[p] for p in self.mfuse]) * (self.extents[self.i] if self.i is not None else 1)


def gemm_form(sch: s_tir.Schedule, block) -> GemmForm | None:
    """Recognise ``C[..] = C[..] + f(loads)`` with one output index per spatial iter var."""
    blk = sch.get(block)
    store = blk.body
    if not isinstance(store, tirx.BufferStore) or blk.init is None:
        return None
    value = store.value
    if not isinstance(value, tirx.Add):
        return None
    acc, rhs = value.a, value.b
    if not (isinstance(acc, _TensorLoad) and acc.source.same_as(store.buffer)):
        return None
    if not isinstance(rhs, (tirx.Mul, tirx.Cast)):
        return None
    ivars = [iv.var for iv in blk.iter_vars]
    pos = {v: n for n, v in enumerate(ivars)}
    reduce_pos = [n for n, iv in enumerate(blk.iter_vars) if iv.iter_type == tirx.IterVar.CommReduce]
    spatial_pos = [n for n, iv in enumerate(blk.iter_vars) if iv.iter_type == tirx.IterVar.DataPar]
    if not reduce_pos or len(reduce_pos) + len(spatial_pos) != len(ivars):
        return None
    extents = [_int(iv.dom.extent) for iv in blk.iter_vars]
    if any(e is None for e in extents):
        return None
    out_pos = []
    for idx in store.indices:
        if isinstance(idx, tirx.Var) and idx in pos:
            out_pos.append(pos[idx])
        elif _int(idx) == 0:
            continue
        else:
            return None
    if not out_pos or sorted(out_pos) != sorted(spatial_pos) or len(set(out_pos)) != len(out_pos):
        return None
    j = out_pos[-1]
    jv = ivars[j]
    loads = [ld for ld in _loads(rhs) if not ld.source.same_as(store.buffer)]
    if not loads:
        return None

    def last_is(ld, v) -> bool:
        return ld.indices and isinstance(ld.indices[-1], tirx.Var) and ld.indices[-1].same_as(v)

    def uses(ld, v) -> bool:
        return any(v in _vars(ix) for ix in ld.indices)

    def only_last(ld, v) -> bool:
        return last_is(ld, v) and not any(v in _vars(ix) for ix in ld.indices[:-1])

    def unit_last(ld, v) -> bool:
        """``v`` only in the last index, as ``v + (terms without v)``: contiguous along ``v``."""
        if not ld.indices or any(v in _vars(ix) for ix in ld.indices[:-1]):
            return False
        last = ld.indices[-1]
        if v not in _vars(last):
            return False
        coef = tvm.sym.detect_linear_equation(last, [v])
        return len(coef) == 2 and _int(coef[0]) == 1 and v not in _vars(coef[1])

    def panel_of(ld, v) -> int:
        """``P`` when ``v`` is read only as ``[.., v // P, .., v % P]`` (pre-packed panels), else 0."""
        if not ld.indices:
            return 0
        last = ld.indices[-1]
        if not (isinstance(last, tirx.FloorMod) and isinstance(last.a, tirx.Var) and last.a.same_as(v)):
            return 0
        p = _int(last.b)
        divs = [ix for ix in ld.indices[:-1] if v in _vars(ix)]
        if (p is None or len(divs) != 1 or not isinstance(divs[0], tirx.FloorDiv)
                or not divs[0].a.same_as(v) or _int(divs[0].b) != p):
            return 0
        return p

    dtype = str(store.buffer.dtype)
    i = out_pos[-2] if len(out_pos) >= 2 else None
    batch = [p for p in out_pos if p not in (i, j)]
    j_loads = [ld for ld in loads if uses(ld, jv)]
    mfuse = []
    if i is not None:
        # batch dims right before i that the j-operand ignores fold into the rows
        for p in reversed(out_pos[:-2]):
            if any(uses(ld, ivars[p]) for ld in j_loads):
                break
            mfuse.insert(0, p)
    batch = [p for p in batch if p not in mfuse]
    if j_loads and all(unit_last(ld, jv) or panel_of(ld, jv) for ld in j_loads):
        panels = [panel_of(ld, jv) for ld in j_loads if not unit_last(ld, jv)]
        packed = math.gcd(*panels) if panels else 0
        return GemmForm("nn", batch, i, j, reduce_pos, extents, dtype,
                        _unique_buffers(ld.source for ld in j_loads if unit_last(ld, jv)), mfuse, packed,
                        _unique_buffers(ld.source for ld in j_loads if not unit_last(ld, jv)))
    if len(reduce_pos) == 1:
        kv = ivars[reduce_pos[0]]
        k_loads = [ld for ld in loads if uses(ld, kv)]
        if k_loads and all(only_last(ld, kv) for ld in k_loads):
            return GemmForm("nt", batch, i, j, reduce_pos, extents, dtype, [], mfuse)
    return None


def _unique_buffers(bufs) -> list:
    out: list = []
    for b in bufs:
        if not any(b.same_as(o) for o in out):
            out.append(b)
    return out


def _choose_nn_tile(m: int, nv: int, max_acc: int) -> tuple[int, int]:
    """(mr, nr) for the outer-product kernel: mr divides m, nr divides nv (vectors along j)."""
    best = (1, 1)
    best_score = -1.0
    for nr in (4, 3, 2, 1, 6, 8):
        if nr > nv or nv % nr:
            continue
        for mr in range(min(m, max_acc // nr), 0, -1):
            if m % mr:
                continue
            acc = mr * nr
            # more accumulators hide the FMA latency; prefer wide nr (fewer broadcasts per FMA)
            score = min(acc, 24) + 0.1 * nr + (0.5 if nr <= 4 else 0)
            if score > best_score:
                best, best_score = (mr, nr), score
            break
    return best


def _choose_nt_tile(m: int, n: int, max_acc: int) -> tuple[int, int]:
    """(mr, nr) for the dot-product kernel: mr divides m, nr divides n, mr * nr <= 24."""
    best, best_score = (1, 1), -1.0
    cap = min(24, max_acc)
    for nr in (6, 4, 8, 3, 2, 5, 7, 1):
        if nr > n or n % nr:
            continue
        for mr in range(min(m, cap // nr, 8), 0, -1):
            if m % mr:
                continue
            # loads per k-chunk: mr + nr vectors for mr * nr FMAs
            score = mr * nr / (mr + nr) + 0.01 * nr
            if score > best_score:
                best, best_score = (mr, nr), score
            break
    return best


def workload_key(func: tirx.PrimFunc) -> str:
    """Structural hash of an unscheduled PrimFunc: the key of its tuning record."""
    return f"{tvm_ffi.structural_hash(func.without_attr('global_symbol')) & 0xFFFFFFFFFFFFFFFF:016x}"


class GemmRule(dlight.ScheduleRule):
    """Register-tiled, cache-blocked matmul with fused prologue and epilogue (see module doc).

    records: workload key (:func:`workload_key`) -> tile configuration found by
    :func:`cachefit.codegen.cpu_tuning.tune_relax` (``mr``, ``nr``, ``pack``, ``stream``; for
    pre-packed weights also ``prefetch``, ``korder``, ``kc`` and ``dist``, see ``_nn``); a
    function without a record, or with one that does not fit it, gets the default heuristics.
    """

    def __init__(self, spec: CPUSpec, records: dict | None = None):
        self.spec = spec
        self.records = dict(records or {})
        self.config: dict = {}
        self._prefetch = None

    def apply(self, func, target, _tunable):
        self._prefetch = None
        sch = self._apply(func, target)
        if sch is not None and self._prefetch is not None:
            try:
                return s_tir.Schedule(_insert_prefetch(sch.mod["main"], self._prefetch))
            except Exception as err:  # pylint: disable=broad-except
                log.debug("no panel prefetch: %s", err)
        return sch

    def _apply(self, func, target):  # pylint: disable=too-many-locals,too-many-branches
        if not isinstance(func, tirx.PrimFunc):
            return None
        self.config = self.records.get(workload_key(func), {}) if self.records else {}
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return None
        main = reductions[0]
        main_pos = [sch.get(b).name_hint for b in blocks].index(sch.get(main).name_hint)
        # prologue: inline what computes an operand element-wise (transpose, dequantize, cast),
        # keep cachefit's own stages (padding, im2col) at the root
        for blk in reversed(blocks[:main_pos]):
            if sch.get(blk).name_hint.startswith(KEEP_PREFIX):
                continue
            try:
                sch.compute_inline(blk)
            except Exception:  # pylint: disable=broad-except
                pass
        form = gemm_form(sch, main)
        if form is None:
            return None
        loops = _loops_match_iters(sch, main)
        if loops is None:
            return None
        # epilogue: inline the chain into its last block
        def split_at_main():
            names = [sch.get(b).name_hint for b in _root_blocks(sch)]
            at = names.index(sch.get(main).name_hint)
            rb = _root_blocks(sch)
            return rb[:at], rb[at + 1:]

        _, after = split_at_main()
        for blk in after[:-1]:
            try:
                sch.compute_inline(blk)
            except Exception:  # pylint: disable=broad-except
                pass
        prologue_root, after = split_at_main()
        conv = sch.get(main).name_hint.startswith(KEEP_PREFIX)
        # im2col columns are exactly the output pixels, and so are the direct conv's when no
        # column is dropped (1x1 without padding): then the epilogue may run on the tile
        if conv and len(after) == 1:
            # the conv GEMM's columns are the flattened output pixels: with the epilogue's two
            # pixel loops fused, it can run on the register tile too; if TVM cannot place it
            # there, it runs at the root over the whole output
            trial = sch.copy()
            try:
                epi = after[-1]
                n_iter = len(trial.get(epi).iter_vars)
                width = _int(trial.get(epi).iter_vars[-1].dom.extent)
                # (.., oh, ow) -> (.., oh * OW + ow): one pixel axis, like the GEMM's columns
                if n_iter == 4 and width:
                    trial.transform_block_layout(epi, lambda a, b, c, d: (a, b, c * width + d))
                elif n_iter == 3 and width:
                    trial.transform_block_layout(epi, lambda a, c, d: (a, c * width + d))
                if (_reads_elementwise(trial, epi, trial.get(main).writes[0].source)
                        and self._finish(trial, main, form, loops, epi, [], prologue_root)):
                    return trial
            except Exception as err:  # pylint: disable=broad-except
                log.debug("conv epilogue stays at the root: %s", err)
            return sch if self._finish(sch, main, form, loops, None, after, prologue_root) else None
        main_out = sch.get(main).writes[0].source
        tile_epilogue = (after[-1] if len(after) == 1 and not conv
                         and _reads_elementwise(sch, after[-1], main_out) else None)
        root_after = after if tile_epilogue is None else []
        return sch if self._finish(sch, main, form, loops, tile_epilogue, root_after, prologue_root) else None

    def _finish(self, sch, main, form, loops, tile_epilogue, root_after, prologue_root) -> bool:
        if form.kind == "nn":
            ok = self._nn(sch, main, form, loops, tile_epilogue)
        else:
            ok = self._nt(sch, main, form, loops, tile_epilogue)
        if not ok:
            return False
        for blk in list(prologue_root) + list(root_after):
            _schedule_injective(sch, blk, self.spec)
        return True

    # -- outer product ----------------------------------------------------------------------

    def _nn(self, sch, main, form: GemmForm, loops, epilogue) -> bool:  # pylint: disable=too-many-locals,too-many-branches,too-many-statements
        spec = self.spec
        ext = form.extents
        lanes = spec.lanes(form.dtype)
        n = ext[form.j]
        while lanes > 1 and (n % lanes or (form.packed and form.packed % lanes)):
            lanes //= 2
        if lanes < 4:
            return False
        m = form.m
        kk = _prod([ext[p] for p in form.k])
        # pre-packed panels: a column tile must lie inside one panel
        nv = (form.packed if form.packed else n) // lanes
        elem = tvm.runtime.DataType(form.dtype).bits // 8
        work = _prod(ext)
        batch_ext = _prod([ext[p] for p in form.batch])
        threads = spec.threads if work >= _PARALLEL_MIN_WORK else 1
        b_bytes = kk * n * elem
        # few rows and a weight that will come from L3 / DRAM: stream it row block by row block
        streaming = m <= 32 and b_bytes >= spec.l2_bytes // 4 and any(kk % kc == 0 for kc in (16, 8))
        streaming = bool(self.config.get("stream", streaming)) and any(kk % kc == 0 for kc in (16, 8))
        # a packed weight is already one sequential stream per panel
        streaming = streaming and not form.packed
        if streaming:
            mr, nr = _choose_nn_tile(m, nv, 16)
        else:
            mr, nr = _choose_nn_tile(m, nv, spec.max_acc)
        if form.packed and m <= 16 and b_bytes >= spec.l2_bytes // 4:
            # a streamed weight and few rows: every row in one tile, so each panel is read once
            # (measured on mlp-tiny, 8 rows: 8x2 tiles 10-15 % faster than 4x4 in the model)
            nr_one = [c for c in (4, 3, 2, 1) if nv % c == 0 and m * c <= 16]
            if nr_one:
                mr, nr = m, nr_one[0]
        mr, nr = self._configured_tile(mr, nr, m, nv)
        n_panels = n // (nr * lanes)
        m_tiles = m // mr
        li, lks, batch_loops = self._canonical_loops(sch, form, loops)

        if streaming and len(lks) == 1:
            return self._nn_streaming(sch, main, li, loops[form.j], lks[0], batch_loops, mr, nr, lanes, kk,
                                      threads, n_panels, epilogue)

        # pack B panels when they are reused by enough row tiles
        pack = bool(self.config.get("pack", m_tiles >= 4)) and bool(form.b_buffers)
        # row blocking: A's rows of one block (mc x K) stay in half of L2
        mc_max = max(1, (spec.l2_bytes // 2) // max(1, kk * elem * mr))
        mc_tiles = max(d for d in range(1, min(mc_max, m_tiles) + 1) if m_tiles % d == 0)
        row_block = m_tiles > mc_tiles
        if threads > 1 and batch_ext * n_panels < threads:
            # too few column panels to share: parallelise over row tiles instead, no packing
            pack = False
            row_block = False

        # A pre-packed weight that comes from L3 / DRAM gets software prefetches. One thread
        # (pass order ``jo, io, k``): while the row tiles of one panel compute (the first from
        # memory, the others from L2), each pass prefetches its slice of the next panel
        # (_insert_prefetch).
        tile = nr * lanes
        sub = max(1, form.packed // tile) if form.packed else 1
        prefetch = bool(form.packed and len(form.packed_buffers) == 1 and len(lks) == 1 and li is not None
                        and not row_block and not batch_loops and b_bytes >= spec.l2_bytes // 4
                        and n_panels % sub == 0 and self.config.get("prefetch", True))
        # with several threads each takes a contiguous share of whole panels (one loop of
        # ``threads`` iterations, so that each thread prefetches its own next panel); an uneven
        # split gets no prefetch
        per_thread = n_panels // threads if threads > 1 else n_panels
        if prefetch and threads > 1 and (n_panels % threads or per_thread % sub):
            prefetch = False
        # Several threads (k-chunk order ``thread, jo, ko, io, ki``, ``korder``): each chunk of a
        # panel (``kc`` k-steps, 8 KiB) is read from memory once and reused by every row tile
        # from L1, the accumulators of all row tiles loaded and stored once per chunk, and each
        # (chunk, row tile) prefetches its slice of the chunk ``dist`` ahead along the thread's
        # share (_insert_stream_prefetch): the weight stream spreads evenly over the whole kernel
        # (the first panel of a share included) instead of arriving in the first pass over each
        # panel (dense-50mb, two threads: 7.2-7.9 -> 6.4-6.9 ms; one thread: the same within
        # noise, so it keeps the pass order).
        # In a parallel kernel a prefetch must stay out of the FMA loop (here it is in the chunk
        # or row-tile loop): the weight pointers of TVM's parallel closure are not ``noalias``,
        # and with a prefetch in the FMA loop LLVM kept the accumulators in memory (16 stores
        # per k step: the kernels ran 2x slower, which made the prefetch look harmful at two
        # threads).
        korder = bool(prefetch and sub == 1 and self.config.get("korder", threads > 1 and m_tiles > 1))
        if (not korder and "prefetch" not in self.config
                and (threads > 1 or kk * form.packed * elem > spec.l2_bytes // 4)):
            # the next whole panel: not when it would not stay in L2 until it is read (vgg19's
            # fc6 / fc7, one row, 6.4 / 1 MiB panels: 42 -> 61 ms, 6.7 -> 8.7 ms at one thread
            # with it), nor with several threads and one row tile (mlp-tiny: 2-6 % slower)
            prefetch = False
        pass_kc = 16 if threads > 1 else 1
        kc = int(self.config.get("kc", 32 if korder else pass_kc)) if prefetch else 1
        if korder and (kc < 1 or kk % kc or kk // kc < 2):
            korder, kc = False, pass_kc
        if kc < 1 or kk % kc:
            kc = 1
        if threads > 1 and kc == 1:
            prefetch = False  # the prefetch would sit in the FMA loop (see above)
        jo, jn, jv = sch.split(loops[form.j], [None, nr, lanes])
        par_t = None
        if prefetch and threads > 1:
            par_t, jo = sch.split(jo, [threads, None])
        if kc > 1:
            ko, ki = sch.split(lks[0], [None, kc])
            lks = [ko, ki]
        if li is not None:
            if row_block:
                io_o, io, ii = sch.split(li, [None, mc_tiles, mr])
                order = batch_loops + [io_o, jo, io, *lks, ii, jn, jv]
            else:
                io_o = None
                io, ii = sch.split(li, [None, mr])
                order = batch_loops + ([jo, lks[0], io, lks[1], ii, jn, jv] if korder
                                       else [jo, io, *lks, ii, jn, jv])
        else:
            io_o = io = ii = None
            order = batch_loops + [jo, *lks, jn, jv]
        sch.reorder(*([par_t] if par_t is not None else []), *order)
        tile_loop = jo if korder or io is None else io

        # accumulator tile in registers
        if epilogue is not None:
            sch.set_scope(main, 0, "local")
            sch.reverse_compute_at(epilogue, tile_loop, preserve_unit_loops=True)
            _vectorize_tile(sch, epilogue, lanes)
        else:
            cw = sch.cache_write(main, 0, "local")
            sch.reverse_compute_at(cw, tile_loop, preserve_unit_loops=True)
            _vectorize_tile(sch, cw, lanes)
        if pack:
            self._pack(sch, main, form, jo, lanes)
        if ii is not None:
            sch.unroll(ii)
        sch.unroll(jn)
        sch.vectorize(jv)
        # parallel before decompose_reduction (TVM parallelises only complete / reduction blocks)
        if par_t is not None:
            sch.parallel(par_t)
        elif threads > 1:
            if io_o is not None:
                outer = batch_loops + [io_o] + ([jo] if batch_ext * (m_tiles // mc_tiles) < threads else [])
            elif batch_ext * n_panels >= threads or io is None:
                outer = batch_loops + [jo]
            else:
                outer = batch_loops + [jo, io]
            _parallel_prefix(sch, outer, threads, work)
        sch.decompose_reduction(main, lks[0])
        if prefetch:
            var = lambda lp: sch.get(lp).loop_var  # noqa: E731
            self._prefetch = _PanelPrefetch(
                buf=form.packed_buffers[0], jo=var(jo), io=var(io), k=var(lks[0]), tile=tile, m_tiles=m_tiles,
                elem=elem, kc=kc, thread=var(par_t) if par_t is not None else None,
                tiles_per_thread=per_thread, korder=korder, dist=int(self.config.get("dist", 1)))
        return True

    def _configured_tile(self, mr: int, nr: int, m: int, nv: int) -> tuple[int, int]:
        """The record's (mr, nr) when it divides the problem and fits the registers, else the default."""
        cmr, cnr = int(self.config.get("mr", mr)), int(self.config.get("nr", nr))
        if cmr >= 1 and cnr >= 1 and m % cmr == 0 and nv % cnr == 0 and cmr * cnr <= self.spec.max_acc:
            return cmr, cnr
        if self.config:
            log.debug("tuning record tile %sx%s does not fit (m=%d, n=%d); default %dx%d", cmr, cnr, m, nv, mr, nr)
        return mr, nr

    def _canonical_loops(self, sch, form: GemmForm, loops):
        """(row loop with the foldable batch dims fused in, one reduction loop, batch loops)."""
        ext = form.extents
        batch_loops = [loops[p] for p in form.batch]
        li = loops[form.i] if form.i is not None else None
        if form.mfuse:
            spatial = batch_loops + [loops[p] for p in form.mfuse] + [li, loops[form.j]]
            sch.reorder(*spatial)
            li = sch.fuse(*[loops[p] for p in form.mfuse], li)
        # several reduction loops stay nested (a conv's channel / tap loops): fusing them would
        # put a division and a modulo into every address of the inner loop
        lks = [loops[p] for p in form.k]
        del ext
        return li, lks, batch_loops

    @staticmethod
    def _pack(sch, main, form: GemmForm, at_loop, lanes: int) -> None:
        for buf in form.b_buffers:
            writers = [b for b in _root_blocks(sch)
                       if any(w.source.same_as(buf) for w in sch.get(b).writes)]
            if len(writers) > 1:
                continue  # the conv's column matrix (im2col + zero tail): already contiguous
            blk = sch.get(main)
            idx = [r.source.same_as(buf) for r in blk.reads].index(True)
            packed = sch.cache_read(main, idx, "global")
            sch.compute_at(packed, at_loop, preserve_unit_loops=True)
            pl = sch.get_loops(packed)
            _split_vec(sch, pl[-1], lanes)

    def _nn_streaming(self, sch, main, li, lj, lk, batch_loops, mr, nr, lanes, kk, threads,
                      n_panels, epilogue) -> bool:  # pylint: disable=too-many-arguments,too-many-locals
        """Few rows, a weight larger than L2: stream the weight row-block by row-block.

        ``k`` is split in chunks of ``kc`` rows; for each chunk every column tile loads its
        accumulators from the output, adds ``kc`` outer products and stores them back, so the
        weight is read once, ``kc`` contiguous rows at a time (hardware prefetch and TLB friendly),
        instead of as ``kc``-strided column panels. The epilogue runs afterwards at the root.
        """
        kc = 16 if kk % 16 == 0 else 8
        jo, jn, jv = sch.split(lj, [None, nr, lanes])
        ko, ki = sch.split(lk, [None, kc])
        par = None
        if threads > 1 and n_panels >= threads:
            par, jo = sch.split(jo, [threads, None]) if n_panels % threads == 0 else (None, jo)
        if li is not None:
            io, ii = sch.split(li, [None, mr])
            inner = [io, ki, ii, jn, jv]
        else:
            io = ii = None
            inner = [ki, jn, jv]
        order = ([par] if par is not None else []) + batch_loops + [ko, jo] + inner
        sch.reorder(*order)
        sch.unroll(ki)
        if ii is not None:
            sch.unroll(ii)
        sch.unroll(jn)
        sch.vectorize(jv)
        if par is not None:
            sch.parallel(par)
        sch.decompose_reduction(main, ko)
        if epilogue is not None:
            _schedule_injective(sch, epilogue, self.spec)
        return True

    # -- dot product ------------------------------------------------------------------------

    def _nt(self, sch, main, form: GemmForm, loops, epilogue) -> bool:  # pylint: disable=too-many-locals
        spec = self.spec
        ext = form.extents
        lanes = spec.lanes(form.dtype)
        kk = ext[form.k[0]]
        while lanes > 1 and kk % lanes:
            lanes //= 2
        if lanes < 4:
            return False
        m = form.m
        n = ext[form.j]
        mr, nr = _choose_nt_tile(m, n, spec.max_acc)
        mr, nr = self._configured_tile(mr, nr, m, n)
        work = _prod(ext)
        threads = spec.threads if work >= _PARALLEL_MIN_WORK else 1
        batch_ext = _prod([ext[p] for p in form.batch])
        li, lks, batch_loops = self._canonical_loops(sch, form, loops)
        del li, batch_loops
        lk = lks[0]
        n_dims = len(sch.get(main).body.indices)
        ko, kv = sch.split(lk, [None, lanes])
        rf = sch.rfactor(kv, factor_axis=n_dims)
        # the rfactor block keeps the loop nest: batch loops, rows, columns, ko, kv
        rloops = sch.get_loops(rf)
        ko, kv = rloops[-2], rloops[-1]
        spatial = rloops[:-2]
        lj = spatial[-1]
        li = spatial[-2] if form.i is not None else None
        batch_loops = spatial[: len(spatial) - (2 if li is not None else 1)]
        jo, jn = sch.split(lj, [None, nr])
        if li is not None:
            io, ii = sch.split(li, [None, mr])
            sch.reorder(*batch_loops, jo, io, ko, ii, jn, kv)
            tile_loop = io
        else:
            io = ii = None
            sch.reorder(*batch_loops, jo, ko, jn, kv)
            tile_loop = jo
        sch.set_scope(rf, 0, "local")
        sch.reverse_compute_at(main, tile_loop, preserve_unit_loops=True)
        if epilogue is not None:
            sch.set_scope(main, 0, "local")
            sch.reverse_compute_at(epilogue, tile_loop, preserve_unit_loops=True)
            _vectorize_tile(sch, epilogue, lanes)
        if ii is not None:
            sch.unroll(ii)
        sch.unroll(jn)
        sch.vectorize(kv)
        if threads > 1:
            n_tiles = batch_ext * (n // nr)
            outer = batch_loops + [jo] if (n_tiles >= threads or io is None) else batch_loops + [jo, io]
            _parallel_prefix(sch, outer, threads, work)
        sch.decompose_reduction(rf, ko)
        return True


@dataclass(frozen=True)
class _PanelPrefetch:
    """Where :func:`_insert_prefetch` puts the prefetches of a GEMM on pre-packed panels.

    buf: the panels ``[N / P, K, P]``; jo, io, k: loop variables over the column tiles (of ``tile``
    columns; relative to the thread's share when ``thread`` is set), the ``m_tiles`` row tiles and
    the chunks of ``kc`` k-steps; elem: bytes per element; thread: the parallel loop over
    contiguous shares of ``tiles_per_thread`` column tiles, or None.
    """

    buf: object
    jo: object
    io: object
    k: object
    tile: int
    m_tiles: int
    elem: int
    kc: int = 1
    thread: object = None
    tiles_per_thread: int = 0
    korder: bool = False
    dist: int = 1


def _insert_prefetch(func: tirx.PrimFunc, pf: _PanelPrefetch) -> tirx.PrimFunc:
    """``func`` with software prefetches of the next weight panel in the ``k`` loop of a GEMM on
    pre-packed panels (see :class:`_PanelPrefetch`).

    Each pass over a panel (``P / tile`` column tiles times ``m_tiles`` row tiles) prefetches its
    share of the next panel into L2, spread evenly over its ``k`` iterations: the weight stream
    from L3 / DRAM then overlaps the passes that compute from L2, instead of stalling the first.
    With a thread loop, "next" stays inside the thread's share (the last panel of a share fetches
    nothing new), so no thread pulls in a panel another one reads.
    """
    if pf.korder:
        return _insert_stream_prefetch(func, pf)
    buf = pf.buf
    panels, kk, p = (int(d) for d in buf.shape)
    sub = max(1, p // pf.tile)
    passes = sub * pf.m_tiles
    per_k = -(-(p * pf.kc) // passes)  # elements of the next panel to fetch per k-loop iteration
    line = max(1, 64 // pf.elem)
    c, cast = _index_arith(buf)
    jo, io, k = cast(pf.jo), cast(pf.io), cast(pf.k)
    if pf.thread is not None:
        share = max(1, pf.tiles_per_thread // sub)  # panels per thread
        nxt = cast(pf.thread) * c(share) + tirx.min(tirx.floordiv(jo, c(sub)) + c(1), c(share - 1))
    else:
        nxt = tirx.min(tirx.floordiv(jo, c(sub)) + c(1), c(panels - 1))
    pass_ = tirx.floormod(jo, c(sub)) * c(pf.m_tiles) + io
    base = tirx.floordiv((pass_ * c(kk) + k * c(pf.kc)) * c(p), c(passes))
    calls = []
    for t in range(0, per_k, line):
        r = tirx.min(base + c(t), c(kk * p - 1))
        calls.append(_prefetch_call(buf, [nxt, tirx.floordiv(r, c(p)), tirx.floormod(r, c(p))]))
    return _prepend_to_loop(func, pf.k, calls)


def _index_arith(buf):
    """``(c, cast)`` for index arithmetic in the type of ``buf``'s indices: ``c(v)`` a constant,
    ``cast(v)`` the expression ``v`` in that type."""
    i64 = str(buf.shape[0].ty)

    def c(v):
        return tirx.const(v, i64)

    def cast(v):
        return v if str(v.ty) == i64 else tirx.Cast(i64, v)

    return c, cast


def _prefetch_call(buf, idx):
    """``llvm.prefetch`` (read, locality 2: into L2 and out, data cache) of ``buf[idx]``."""
    addr = tirx.address_of(tirx.BufferLoad(buf, idx))
    return tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", addr, tirx.const(0, "int32"),
                                               tirx.const(2, "int32"), tirx.const(1, "int32")))


def _prepend_to_loop(func: tirx.PrimFunc, var, calls: list) -> tirx.PrimFunc:
    """``func`` with ``calls`` at the start of the body of the loop over ``var``."""

    def visit(node, mutator):
        if isinstance(node, tirx.For) and node.loop_var.same_as(var):
            return tirx.For(node.loop_var, node.min, node.extent, node.kind, tirx.SeqStmt(calls + [node.body]),
                            node.thread_binding, node.annotations)
        return mutator.default_mutate(node)

    return tvm_ffi.structural_mutate(func, ((tirx.For, visit),))


def _insert_stream_prefetch(func: tirx.PrimFunc, pf: _PanelPrefetch) -> tirx.PrimFunc:
    """Prefetches for the k-chunk-outer order (``jo, ko, io, ki, ...``, a column tile = a panel):
    a thread's share of panels is one contiguous stream in memory; each (``ko``, ``io``)
    iteration fetches its slice (1 / ``m_tiles``) of the chunk ``dist`` chunks ahead (into the
    next panel at the end of one, never past the share)."""
    buf = pf.buf
    _, kk, p = (int(d) for d in buf.shape)
    c, cast = _index_arith(buf)
    jo, io, ko = cast(pf.jo), cast(pf.io), cast(pf.k)
    share = pf.tiles_per_thread if pf.thread is not None else int(buf.shape[0])
    start = cast(pf.thread) * c(share * kk * p) if pf.thread is not None else c(0)
    chunk = pf.kc * p
    slice_ = -(-chunk // pf.m_tiles)
    line = max(1, 64 // pf.elem)
    off = (jo * c(kk) + (ko + c(pf.dist)) * c(pf.kc)) * c(p) + io * c(slice_)
    calls = []
    for t in range(0, slice_, line):
        flat = start + tirx.min(off + c(t), c(share * kk * p - 1))  # in memory order
        calls.append(_prefetch_call(buf, [tirx.floordiv(flat, c(kk * p)),
                                          tirx.floormod(tirx.floordiv(flat, c(p)), c(kk)),
                                          tirx.floormod(flat, c(p))]))
    return _prepend_to_loop(func, pf.io, calls)


def _vectorize_tile(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorise the innermost loop of a tile-level block (write-back or epilogue)."""
    loops = sch.get_loops(block)
    if loops:
        _split_vec(sch, loops[-1], lanes)


# ---------------------------------------------------------------------------------------------
# Everything else
# ---------------------------------------------------------------------------------------------


def _schedule_injective(sch: s_tir.Schedule, block, spec: CPUSpec) -> None:
    """Root-level spatial block: vectorise the innermost loop, parallelise the outer ones."""
    loops = sch.get_loops(block)
    if not loops:
        return
    blk = sch.get(block)
    dtype = str(blk.writes[0].source.dtype) if blk.writes else "float32"
    lanes = spec.lanes(dtype)
    work = _prod([_extent(sch, lp) or 1 for lp in loops])
    inner = loops[-1]
    inner_ext = _extent(sch, inner) or 1
    outer = list(loops[:-1])
    if inner_ext > 4 * lanes:
        o, i = sch.split(inner, [None, lanes]) if inner_ext % lanes == 0 else (None, None)
        if i is not None:
            sch.vectorize(i)
            outer.append(o)
    elif inner_ext >= 4:
        _split_vec(sch, inner, lanes)
    _parallel_prefix(sch, outer, spec.threads, work)


def _schedule_reduction_block(sch: s_tir.Schedule, block, spec: CPUSpec) -> None:
    """A root-level reduction (pooling, mean over an outer axis): spatial loops outside, the
    innermost spatial loop vectorised inside the reduction loops when the output is contiguous."""
    loops = _loops_match_iters(sch, block)
    if loops is None:
        return
    blk = sch.get(block)
    kinds = [iv.iter_type for iv in blk.iter_vars]
    s_loops = [lp for lp, kd in zip(loops, kinds) if kd == tirx.IterVar.DataPar]
    r_loops = [lp for lp, kd in zip(loops, kinds) if kd == tirx.IterVar.CommReduce]
    work = _prod([_extent(sch, lp) or 1 for lp in loops])
    dtype = str(blk.writes[0].source.dtype) if blk.writes else "float32"
    lanes = spec.lanes(dtype)
    if not s_loops:
        return
    store = blk.body
    last_out = store.indices[-1] if isinstance(store, tirx.BufferStore) and store.indices else None
    inner_s = s_loops[-1]
    inner_var = blk.iter_vars[list(loops).index(inner_s)].var
    inner_ext = _extent(sch, inner_s) or 1
    if (r_loops and isinstance(last_out, tirx.Var) and last_out.same_as(inner_var)
            and inner_ext >= 4):
        vec_len = lanes if inner_ext % lanes == 0 else (8 if inner_ext % 8 == 0 else (4 if inner_ext % 4 == 0 else 0))
        if vec_len and inner_ext > vec_len:
            so, si = sch.split(inner_s, [None, vec_len])
            sch.reorder(*s_loops[:-1], so, *r_loops, si)
            sch.vectorize(si)
            # parallel before the init is split off: a loop over an update block without its
            # init cannot be made parallel (the pools stayed on one thread)
            _parallel_prefix(sch, s_loops[:-1] + [so], spec.threads, work)
            sch.decompose_reduction(block, r_loops[0])
            return
        if vec_len:
            sch.reorder(*s_loops[:-1], *r_loops, inner_s)
            sch.vectorize(inner_s)
            _parallel_prefix(sch, s_loops[:-1], spec.threads, work)
            sch.decompose_reduction(block, r_loops[0])
            return
    _parallel_prefix(sch, s_loops, spec.threads, work)


def _innermost_axis_kept(block) -> bool:
    """Whether a reduction block stores along the same spatial iterator its input's innermost
    axis is read with (the reduction runs over outer axes only)."""
    store = block.body
    if not isinstance(store, tirx.BufferStore) or not store.indices:
        return False
    last = store.indices[-1]
    spatial = {iv.var for iv in block.iter_vars if iv.iter_type == tirx.IterVar.DataPar}
    if not isinstance(last, tirx.Var) or last not in spatial:
        return False
    return any(isinstance(ld.indices[-1], tirx.Var) and ld.indices[-1].same_as(last)
               for ld in _loads(store.value) if not ld.source.same_as(store.buffer) and ld.indices)


class ReductionRule(dlight.ScheduleRule):
    """Softmax / layer norm / RMS norm: row reductions followed by element-wise blocks.

    Every block shares the leading spatial axes (the rows); they are fused into one loop
    (parallel when the stage owns several threads) and every block is computed at it, so a row is
    read from cache by each of its stages. Element-wise blocks are vectorised along the row, the
    inner reduction loops are split into vector-length chunks and unrolled.
    """

    def __init__(self, spec: CPUSpec):
        self.spec = spec

    def apply(self, func, target, _tunable):  # pylint: disable=too-many-return-statements
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2:
            return None
        if all(bi.is_injective() for bi in infos) or not infos[-1].is_injective():
            return None
        # a reduction over outer axes whose innermost axis stays (a mean over the rows and columns
        # of an NCHWc tensor: the lanes of the channel block) is vectorised along that axis by the
        # fallback's root-level reduction schedule; rows here would read it one strided scalar at a time
        if any(not bi.is_injective() and _innermost_axis_kept(sch.get(bi.block_rv)) for bi in infos):
            return None
        lead = None
        for bi in infos:
            kinds = bi.dom_kind()
            n_lead = len(kinds) - len(kinds.lstrip("S"))
            if n_lead == 0:
                return None
            lead = n_lead if lead is None else min(lead, n_lead)
        # the blocks must agree on the rows (dlight's normalisation drops unit axes, so a
        # [1, n] softmax would otherwise take its n columns for rows)
        row_exts = set()
        for bi in infos:
            doms = [_int(it.dom) for it in bi.iters[:lead]]
            if None in doms:
                return None
            row_exts.add(_prod(doms))
        if len(row_exts) != 1:
            return None
        last = infos[-1].block_rv
        dtype = str(sch.get(last).writes[0].source.dtype) if sch.get(last).writes else "float32"
        lanes = self.spec.lanes(dtype)
        # row reductions over a contiguous axis: vector partial sums (rfactor), reduced across
        # lanes once per row; a scalar chain through memory costs a store-to-load latency per element
        partials = []
        for bi in infos:
            kinds = bi.dom_kind()
            if bi.is_injective() or kinds.count("R") != 1 or kinds[-1] != "R":
                continue
            red = sch.get_loops(bi.block_rv)[-1]
            ext = _extent(sch, red)
            if ext is None or ext < 2 * lanes or ext % lanes:
                continue
            n_out = len(sch.get(bi.block_rv).body.indices) if isinstance(sch.get(bi.block_rv).body, tirx.BufferStore) else None
            if n_out is None:
                continue
            try:
                _, vec = sch.split(red, [None, lanes])
                partials.append(sch.rfactor(vec, factor_axis=n_out))
            except Exception:  # pylint: disable=broad-except
                log.debug("no vector partial sums for %s", sch.get(bi.block_rv).name_hint)
        blocks = _root_blocks(sch)
        last = blocks[-1]
        loops = sch.get_loops(last)
        work = _prod([_extent(sch, lp) or 1 for lp in loops])
        rows = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
        row_ext = _extent(sch, rows) or 1
        if self.spec.threads > 1 and work >= _PARALLEL_MIN_WORK and row_ext >= self.spec.threads:
            sch.parallel(rows)
        for blk in reversed(blocks[:-1]):
            sch.compute_at(blk, rows, preserve_unit_loops=True)
        partial_names = {sch.get(b).name_hint for b in partials}
        for blk in blocks:
            blk_loops = sch.get_loops(blk)
            if len(blk_loops) <= 1:
                continue
            inner = blk_loops[-1]
            name = sch.get(blk).name_hint
            if name in partial_names:
                # rfactor's lane loop goes innermost, below the remaining reduction loop
                lane_iter = [n for n, iv in enumerate(sch.get(blk).iter_vars)
                             if iv.iter_type == tirx.IterVar.DataPar and _int(iv.dom.extent) == lanes][0]
                lane_loop = _loop_binding(sch, blk, lane_iter)
                red_loop = [lp for lp in blk_loops if not sch.get(lp).loop_var.same_as(sch.get(lane_loop).loop_var)][-1]
                sch.reorder(red_loop, lane_loop)
                sch.set_scope(blk, 0, "local")
                sch.vectorize(lane_loop)
                sch.decompose_reduction(blk, red_loop)
            elif _is_reduction(sch, blk):
                longer = [lp for lp in blk_loops[1:] if (_extent(sch, lp) or 0) > 1]
                if longer and (_extent(sch, longer[-1]) or 0) <= 4 * lanes:
                    sch.unroll(longer[-1])
            else:
                _split_vec(sch, inner, lanes)
        return sch


class InjectiveRule(dlight.ScheduleRule):
    """Fallback: every root block on its own (parallel outer loops, vectorised inner loop)."""

    def __init__(self, spec: CPUSpec):
        self.spec = spec

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        # inline element-wise chains first (fewer passes over memory)
        for blk in blocks[:-1]:
            if _is_reduction(sch, blk):
                continue
            try:
                sch.compute_inline(blk)
            except Exception:  # pylint: disable=broad-except
                pass
        for blk in _root_blocks(sch):
            try:
                if _is_reduction(sch, blk):
                    _schedule_reduction_block(sch, blk, self.spec)
                else:
                    _schedule_injective(sch, blk, self.spec)
            except Exception as err:  # pylint: disable=broad-except
                log.debug("injective schedule of block %s failed: %s", sch.get(blk).name_hint, err)
        return sch


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def default_rules(spec: CPUSpec, records: dict | None = None) -> list:
    """cachefit's CPU rules in the order they are tried (``records``: see :class:`GemmRule`)."""
    return [__import__("cachefit.codegen.cpu_conv", fromlist=["NCHWcConvRule"]).NCHWcConvRule(spec), GemmRule(spec, records), ReductionRule(spec), InjectiveRule(spec)]


@tvm.transform.module_pass(opt_level=0, name="ScheduleCPU")
class ScheduleCPU:
    """Schedule every unscheduled PrimFunc of a module with cachefit's CPU rules.

    spec: tile sizes and thread count (:meth:`CPUSpec.for_target` by default).
    records: tuned matmul tiles by workload key (:mod:`cachefit.codegen.cpu_tuning`).
    A rule that fails on a function (an unexpected block structure) is skipped and the next is
    tried; a function no rule takes keeps its naive loops. Functions already marked
    ``tirx.is_scheduled`` (meta-schedule records) are left alone.
    """

    def __init__(self, target: Target, spec: CPUSpec | None = None, records: dict | None = None):
        self.target = target
        self.spec = spec or CPUSpec.for_target(target)
        self.rules = default_rules(self.spec, records)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                continue
            sch = schedule_func(func, self.target, self.rules)
            if sch is not None:
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if not updates:
            return mod
        out = mod.clone()
        for gv, func in updates.items():
            out[gv] = func
        return out


def schedule_func(func: tirx.PrimFunc, target: Target, rules: list):
    """Apply the first rule that takes ``func``; returns its schedule or None."""
    for rule in rules:
        try:
            sch = rule.apply(func, target, False)
        except Exception as err:  # pylint: disable=broad-except
            log.debug("%s failed on %s: %s", type(rule).__name__, func.attrs.get("global_symbol") if func.attrs else "?", err)
            continue
        if sch is not None:
            return sch
    return None

