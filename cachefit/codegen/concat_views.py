"""Concatenations without a copy: the producers of a concatenation write into its output.

A concatenation along an axis whose leading dimensions are all 1 (the channel axis of a
batch-1 NCHW or NCHWc tensor, as in SqueezeNet's fire modules or Inception blocks) places each
part in one contiguous byte range of the output. Two steps remove its copy:

* :func:`legalize_concat` (a ``LegalizeOps`` entry for ``relax.concat``) legalizes as TVM does
  and marks the PrimFunc of such a concatenation with :data:`CONCAT_ATTR` (the axis).
* :class:`ConcatIntoStorage` (after ``StaticPlanBlockMemory``): for a call of a marked
  concatenation whose every part is a planned tensor written by exactly one PrimFunc call and
  read by nothing but the concatenation, the parts and the output become tensors of one fresh
  storage, each part at its byte offset in the output, and the concatenation call is dropped.

The storage is a new one, not one of the plan's: the output must be live from its first
producer on, which the plan did not arrange. A part at a nonzero offset goes through
``R.memory.ensure_zero_offset`` (compiled PrimFuncs take tensors with ``byte_offset == 0``; on
the CPU the VM then moves the data pointer, no copy, when the offset is a multiple of 64 bytes:
a concatenation whose parts do not all start at such an offset keeps its copy).
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import relax, tirx

log = logging.getLogger(__name__)

CONCAT_ATTR = "cachefit.concat_axis"
#: byte alignment every part must start at: the VM's ``ensure_zero_offset`` moves the data pointer
#: only for offsets that keep its allocation alignment (64) and copies otherwise, and compiled
#: kernels assume 64-byte aligned data
ALIGNMENT = 64


def _static_shape(ty) -> list[int] | None:
    shape = getattr(ty, "shape", None)
    dims = getattr(shape, "values", None)
    if dims is None:
        return None
    out = []
    for d in dims:
        if not isinstance(d, (int, tirx.IntImm)):
            return None
        out.append(int(d))
    return out


def viewable_concat(shapes: list[list[int] | None], axis: int) -> bool:
    """Whether parts of these shapes concatenated along ``axis`` each fill one contiguous range of
    the output: static shapes of one rank, every dimension before ``axis`` equal to 1."""
    if not shapes or any(s is None for s in shapes):
        return False
    rank = len(shapes[0])
    if any(len(s) != rank for s in shapes) or not -rank <= axis < rank:
        return False
    axis %= rank
    return all(d == 1 for s in shapes for d in s[:axis])


def legalize_concat(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """``relax.concat`` legalized by TVM's own rule; the PrimFunc is marked with
    :data:`CONCAT_ATTR` when :func:`viewable_concat` holds for its parts."""
    out = tvm.ir.Op.get("relax.concat").get_attr("FLegalize")(bb, call)
    fields = getattr(call.args[0].ty, "fields", None)
    axis = call.attrs.axis
    if fields is None or axis is None or not isinstance(out, relax.Call) or not isinstance(out.args[0], relax.GlobalVar):
        return out
    if not viewable_concat([_static_shape(f) for f in fields], int(axis)):
        return out
    dtypes = {str(f.dtype) for f in fields} | {str(call.ty.dtype)}
    if len(dtypes) != 1:
        return out
    gv = out.args[0]
    func = bb.get()[gv]
    if isinstance(func, tirx.PrimFunc):
        bb.update_func(gv, func.with_attr(CONCAT_ATTR, int(axis) % len(fields[0].shape)))
    return out


@tvm.transform.module_pass(opt_level=0, name="ConcatIntoStorage")
class ConcatIntoStorage:
    """Drop the copy of every marked concatenation (:func:`legalize_concat`) whose parts can be
    written in place; run after ``StaticPlanBlockMemory``, before ``LowerAllocTensor``.

    A concatenation is rewritten only when every part is a distinct tensor allocated in the same
    binding block (``R.memory.alloc_tensor`` of the plan), written by one PrimFunc call (as its
    last argument) before the concatenation and used by nothing else: another reader, a return
    or a tuple keeps the copy, since the part would then outlive or escape the new storage's
    layout; so does a part that would start at an offset not a multiple of :data:`ALIGNMENT`.
    Anything else is left as it is.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        marked = {gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and f.attrs is not None and CONCAT_ATTR in f.attrs}
        if not marked:
            return mod
        out = mod
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            blocks = [_rewrite_block(b, marked, func.body.body) for b in func.body.blocks]
            if all(new.same_as(old) for new, old in zip(blocks, func.body.blocks)):
                continue
            if out is mod:
                out = mod.clone()
            body = relax.SeqExpr(blocks, func.body.body)
            out[gv] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs, func.span)
        return out


_ALLOC_OPS = ("relax.memory.alloc_tensor", "relax.builtin.alloc_tensor")


def _rewrite_block(block, marked: set, result: relax.Expr):
    """The block with the copy of every eligible concatenation removed (or the block itself)."""
    if isinstance(block, relax.DataflowBlock):
        return block
    mem_alloc = tvm.ir.Op.get("relax.memory.alloc_tensor")
    allocs = {tvm.ir.Op.get(name) for name in _ALLOC_OPS}
    bindings = list(block.bindings)
    index = {b.var: i for i, b in enumerate(bindings)}
    # alias chains (lv = alloc) to their root
    parent = {b.var: b.value for b in bindings if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Var)}

    def root(v):
        while v in parent:
            v = parent[v]
        return v

    # every use of a root tensor (through its aliases): (binding index, how)
    uses: dict = {}
    for i, b in enumerate(bindings):
        value = b.value
        if isinstance(value, relax.Var):
            continue
        if isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar):
            for k, a in enumerate(value.args):
                if isinstance(a, relax.Var):
                    uses.setdefault(root(a), []).append((i, "out" if k == len(value.args) - 1 else "in"))
            continue
        for v in relax.analysis.free_vars(value):
            uses.setdefault(root(v), []).append((i, "other"))
    for v in relax.analysis.free_vars(result):
        uses.setdefault(root(v), []).append((len(bindings), "other"))

    def is_alloc(v) -> bool:
        """Whether ``v`` is a tensor allocated in this block on device 0 of the global scope."""
        b = bindings[index[v]] if v in index else None
        if b is None or not isinstance(b.value, relax.Call) or not any(b.value.op.same_as(o) for o in allocs):
            return False
        if b.value.op.same_as(mem_alloc):  # (storage, offset, shape, dtype, device)
            sb = bindings[index[b.value.args[0]]] if b.value.args[0] in index else None
            return (sb is not None and isinstance(sb.value, relax.Call)
                    and _on_host(sb.value.args[1]) and str(sb.value.args[2].value) == "global")
        return _on_host(b.value.args[2]) and str(b.value.args[3].value) == "global"  # (shape, dtype, device, scope)

    replace: dict = {}      # binding index -> new bindings
    insert: dict = {}       # binding index -> bindings placed before it
    drop = set()
    rewritten = 0
    for i, b in enumerate(bindings):
        call = b.value
        if not (isinstance(call, relax.Call) and isinstance(call.op, relax.GlobalVar) and call.op.name_hint in marked):
            continue
        *parts, dst = call.args
        roots = [root(p) if isinstance(p, relax.Var) else None for p in parts]
        dst_root = root(dst) if isinstance(dst, relax.Var) else None
        if dst_root is None or not is_alloc(dst_root) or None in roots or len(set(roots)) != len(roots):
            continue
        ok = True
        for r in roots:
            if not is_alloc(r) or not bindings[index[r]].value.op.same_as(mem_alloc) or index[r] in replace:
                ok = False
                break
            u = uses.get(r, [])
            writers = [j for j, how in u if how == "out"]
            others = [(j, how) for j, how in u if how != "out" and j != i]
            if len(writers) != 1 or others or writers[0] >= i:
                ok = False
                break
            writer = bindings[writers[0]].value
            if writer.op.name_hint in marked:  # a nested concatenation keeps its own storage
                ok = False
                break
        dtype = str(dst_root.ty.dtype)
        shapes = [_static_shape(r.ty) for r in roots] if ok else []
        if not ok or any(s is None for s in shapes) or any(str(r.ty.dtype) != dtype for r in roots):
            continue
        itemsize = tvm.DataType(dtype).bits // 8
        sizes = [int(np.prod(s)) * itemsize for s in shapes]
        dst_shape = _static_shape(dst_root.ty)
        if dst_shape is None or int(np.prod(dst_shape)) * itemsize != sum(sizes):
            continue
        if any(off % ALIGNMENT for off in np.cumsum(sizes[:-1])):
            continue
        storage = relax.Var(f"concat_storage{rewritten}", relax.ObjectType())
        first = min([index[r] for r in roots] + [index[dst_root]])
        insert[first] = [relax.VarBinding(storage, relax.op.memory.alloc_storage(
            relax.ShapeExpr([sum(sizes)]), 0, "global", dtype))]
        offset = 0
        for r, shape, size in zip(roots, shapes, sizes):
            tensor = relax.op.memory.alloc_tensor(storage, offset, relax.ShapeExpr(shape), dtype)
            if offset:
                raw = relax.Var(f"{r.name}_at{offset}", r.ty)
                replace[index[r]] = [relax.VarBinding(raw, tensor),
                                     relax.VarBinding(r, relax.op.memory.ensure_zero_offset(raw))]
            else:
                replace[index[r]] = [relax.VarBinding(r, tensor)]
            offset += size
        replace[index[dst_root]] = [relax.VarBinding(dst_root, relax.op.memory.alloc_tensor(
            storage, 0, relax.ShapeExpr(dst_shape), dtype))]
        drop.add(i)
        rewritten += 1
    if not rewritten:
        return block
    new = []
    for i, b in enumerate(bindings):
        new += insert.get(i, [])
        if i in drop:
            continue
        new += replace.get(i, [b])
    # a storage of the plan that held only rewritten tensors is no longer used
    storage_op = tvm.ir.Op.get("relax.memory.alloc_storage")
    used = set()
    for b in new:
        if not isinstance(b.value, relax.Var):
            used |= set(relax.analysis.free_vars(b.value))
        else:
            used.add(b.value)
    used |= set(relax.analysis.free_vars(result))
    new = [b for b in new if not (isinstance(b.value, relax.Call) and b.value.op.same_as(storage_op)
                                  and b.var not in used)]
    log.debug("%d concatenation(s) written in place", rewritten)
    return relax.BindingBlock(new, block.span)


def _on_host(device) -> bool:
    """Whether a device index argument (a PrimValue or an int) is 0."""
    value = getattr(device, "value", device)
    try:
        return int(value) == 0
    except (TypeError, ValueError):
        return False
