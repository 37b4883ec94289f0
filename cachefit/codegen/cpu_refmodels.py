"""Reference ONNX models for the CPU kernel tests and ``bench/kernels.py``.

Small models built with ``onnx.helper`` (an MLP, a GPT-2 style and a Llama style attention block,
a small conv net) and loaders for the onnx package's light model-zoo CNNs with random weights in
place of their ``ConstantOfShape(0.02)`` initialisers (whose constant outputs would make any
comparison with onnxruntime meaningless).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ModelError

#: ONNX IR version of the built models (onnxruntime refuses IR > 13, the light zoo files are IR 3).
IR_VERSION = 9
OPSET = 17


def _onnx():
    import onnx  # pylint: disable=import-outside-toplevel

    return onnx


def _make_model(nodes, inputs, outputs, inits, name: str):
    onnx = _onnx()
    h = onnx.helper
    graph = h.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="cachefit")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _init(name: str, arr: np.ndarray):
    return _onnx().numpy_helper.from_array(np.ascontiguousarray(arr), name)


def _value_info(name: str, shape, dtype=np.float32):
    onnx = _onnx()
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), list(shape))


def mlp(batch: int = 8, width: int = 256, layers: int = 4, seed: int = 0, *, gemm: bool = False):
    """``layers`` x (MatMul + Add bias + Relu), ``batch x width`` activations (the issue's tiny MLP).

    ``gemm=True`` writes ``Gemm(transB=1)`` nodes instead, as torch's exporter does for ``nn.Linear``.
    """
    onnx = _onnx()
    h = onnx.helper
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    scale = 1.0 / np.sqrt(width)
    for i in range(layers):
        w = (rng.standard_normal((width, width)) * scale).astype(np.float32)
        b = (rng.standard_normal(width) * 0.1).astype(np.float32)
        inits.append(_init(f"fc{i}.bias", b))
        if gemm:
            inits.append(_init(f"fc{i}.weight", np.ascontiguousarray(w.T)))
            nodes.append(h.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [f"g{i}"], transB=1))
            pre = f"g{i}"
        else:
            inits.append(_init(f"fc{i}.weight", w))
            nodes.append(h.make_node("MatMul", [x, f"fc{i}.weight"], [f"m{i}"]))
            nodes.append(h.make_node("Add", [f"m{i}", f"fc{i}.bias"], [f"a{i}"]))
            pre = f"a{i}"
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(h.make_node("Relu", [pre], [out]))
        x = out
    return _make_model(nodes, [_value_info("x", (batch, width))], [_value_info("y", (batch, width))],
                       inits, "mlp")


def dense_reference(batch: int = 8, width: int = 1792, layers: int = 4, seed: int = 0):
    """The "50 MB-class" dense model: ``layers`` square fp32 layers of ``width`` (4 x 1792^2 x 4 B = 51 MB)."""
    return mlp(batch=batch, width=width, layers=layers, seed=seed)


def transformer_block(
    seq: int = 32, d_model: int = 128, heads: int = 4, ffn: int = 512, layers: int = 2,
    seed: int = 0, *, style: str = "gpt2",
):
    """A tiny decoder: ``layers`` x (norm, causal self-attention, residual, norm, MLP, residual).

    ``style="gpt2"``: LayerNormalization, biases, Gelu MLP. ``style="llama"``: RMSNorm written as
    Pow/ReduceMean/Sqrt/Div/Mul, no biases, SiLU-gated MLP. Batch 1, input ``x: [1, seq, d_model]``.
    """
    if style not in ("gpt2", "llama"):
        raise ModelError(f"unknown transformer style {style!r}: use 'gpt2' or 'llama'")
    if d_model % heads:
        raise ModelError(f"d_model={d_model} is not a multiple of heads={heads}: pick heads dividing it")
    onnx = _onnx()
    h = onnx.helper
    rng = np.random.default_rng(seed)
    dh = d_model // heads
    nodes, inits = [], []

    def w(name, shape, scale=None):
        s = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        inits.append(_init(name, (rng.standard_normal(shape) * s).astype(np.float32)))
        return name

    def const(name, arr):
        inits.append(_init(name, np.asarray(arr)))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(h.make_node(op, ins, [out], **attrs))
        return out

    mask = np.triu(np.full((seq, seq), -1e4, np.float32), 1)
    const("mask", mask.reshape(1, 1, seq, seq))
    const("shape_heads", np.array([1, seq, heads, dh], np.int64))
    const("shape_model", np.array([1, seq, d_model], np.int64))
    const("scale", np.array(1.0 / np.sqrt(dh), np.float32))
    const("two", np.array(2.0, np.float32))
    const("eps", np.array(1e-5, np.float32))

    def norm(p, x):
        if style == "gpt2":
            g = w(f"{p}.weight", (d_model,), 0.1)
            b = w(f"{p}.bias", (d_model,), 0.1)
            return node("LayerNormalization", [x, g, b], f"{p}.out", axis=-1, epsilon=1e-5)
        g = w(f"{p}.weight", (d_model,), 0.1)
        sq = node("Pow", [x, "two"], f"{p}.sq")
        ms = node("ReduceMean", [sq], f"{p}.ms", axes=[-1], keepdims=1)
        ms_eps = node("Add", [ms, "eps"], f"{p}.mse")
        rms = node("Sqrt", [ms_eps], f"{p}.rms")
        xn = node("Div", [x, rms], f"{p}.xn")
        return node("Mul", [xn, g], f"{p}.out")

    def linear(p, x, din, dout):
        y = node("MatMul", [x, w(f"{p}.weight", (din, dout))], f"{p}.mm")
        if style == "gpt2":
            y = node("Add", [y, w(f"{p}.bias", (dout,), 0.1)], f"{p}.out")
        return y

    x = "x"
    for i in range(layers):
        p = f"layers.{i}"
        hn = norm(f"{p}.ln1", x)
        qkv = []
        for t in ("q", "k", "v"):
            y = linear(f"{p}.attn.{t}", hn, d_model, d_model)
            y = node("Reshape", [y, "shape_heads"], f"{p}.{t}.r")
            perm = [0, 2, 3, 1] if t == "k" else [0, 2, 1, 3]
            qkv.append(node("Transpose", [y], f"{p}.{t}.t", perm=perm))
        q, k, v = qkv
        s = node("MatMul", [q, k], f"{p}.scores")
        s = node("Mul", [s, "scale"], f"{p}.scaled")
        s = node("Add", [s, "mask"], f"{p}.masked")
        a = node("Softmax", [s], f"{p}.probs", axis=-1)
        o = node("MatMul", [a, v], f"{p}.ctx")
        o = node("Transpose", [o], f"{p}.ctx.t", perm=[0, 2, 1, 3])
        o = node("Reshape", [o, "shape_model"], f"{p}.ctx.r")
        o = linear(f"{p}.attn.o", o, d_model, d_model)
        x = node("Add", [x, o], f"{p}.res1")
        hn = norm(f"{p}.ln2", x)
        if style == "gpt2":
            u = linear(f"{p}.mlp.fc", hn, d_model, ffn)
            u = _gelu_tanh(node, f"{p}.mlp", u, const)
            d = linear(f"{p}.mlp.proj", u, ffn, d_model)
        else:
            gt = linear(f"{p}.mlp.gate", hn, d_model, ffn)
            up = linear(f"{p}.mlp.up", hn, d_model, ffn)
            sg = node("Sigmoid", [gt], f"{p}.mlp.sig")
            act = node("Mul", [gt, sg], f"{p}.mlp.silu")
            u = node("Mul", [act, up], f"{p}.mlp.gated")
            d = linear(f"{p}.mlp.down", u, ffn, d_model)
        x = node("Add", [x, d], "y" if i == layers - 1 else f"{p}.res2")
    return _make_model(nodes, [_value_info("x", (1, seq, d_model))], [_value_info("y", (1, seq, d_model))],
                       inits, f"tiny_{style}")


def _gelu_tanh(node, p, u, const):
    """GELU (tanh form) from elementary ops: 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
    c0 = const(f"{p}.c0", np.array(0.044715, np.float32))
    c1 = const(f"{p}.c1", np.array(np.sqrt(2.0 / np.pi), np.float32))
    c2 = const(f"{p}.c2", np.array(0.5, np.float32))
    c3 = const(f"{p}.c3", np.array(1.0, np.float32))
    u3 = node("Mul", [node("Mul", [u, u], f"{p}.u2"), u], f"{p}.u3")
    inner = node("Add", [u, node("Mul", [u3, c0], f"{p}.u3c")], f"{p}.in")
    t = node("Tanh", [node("Mul", [inner, c1], f"{p}.inc")], f"{p}.tanh")
    return node("Mul", [node("Mul", [u, c2], f"{p}.uh"), node("Add", [t, c3], f"{p}.t1")], f"{p}.act")


def small_convnet(batch: int = 1, size: int = 32, seed: int = 0):
    """Conv3x3(3->16)+Relu, Conv3x3 s2 (16->32)+BN+Relu, Conv1x1(32->32)+residual Add, MaxPool, Gemm."""
    onnx = _onnx()
    h = onnx.helper
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, shape, scale):
        inits.append(_init(name, (rng.standard_normal(shape) * scale).astype(np.float32)))
        return name

    def node(op, ins, out, **attrs):
        nodes.append(h.make_node(op, ins, [out], **attrs))
        return out

    x = node("Conv", ["x", w("c1.w", (16, 3, 3, 3), 0.2), w("c1.b", (16,), 0.1)], "c1", pads=[1, 1, 1, 1])
    x = node("Relu", [x], "r1")
    x = node("Conv", [x, w("c2.w", (32, 16, 3, 3), 0.1)], "c2", pads=[1, 1, 1, 1], strides=[2, 2])
    inits.append(_init("bn.scale", rng.uniform(0.5, 1.5, 32).astype(np.float32)))
    inits.append(_init("bn.bias", (rng.standard_normal(32) * 0.1).astype(np.float32)))
    inits.append(_init("bn.mean", (rng.standard_normal(32) * 0.1).astype(np.float32)))
    inits.append(_init("bn.var", rng.uniform(0.5, 1.5, 32).astype(np.float32)))
    x = node("BatchNormalization", [x, "bn.scale", "bn.bias", "bn.mean", "bn.var"], "bn")
    r = node("Relu", [x], "r2")
    x = node("Conv", [r, w("c3.w", (32, 32, 1, 1), 0.2), w("c3.b", (32,), 0.1)], "c3")
    x = node("Add", [x, r], "res")
    x = node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = node("Flatten", [x], "flat")
    feat = 32 * (size // 4) * (size // 4)
    node("Gemm", [x, w("fc.w", (10, feat), 1 / np.sqrt(feat)), w("fc.b", (10,), 0.1)], "y", transB=1)
    return _make_model(nodes, [_value_info("x", (batch, 3, size, size))], [_value_info("y", (batch, 10))],
                       inits, "small_convnet")


LIGHT_MODELS = ("resnet50", "vgg19", "squeezenet", "bvlc_alexnet", "inception_v1", "inception_v2",
                "densenet121", "shufflenet", "zfnet512")


def light_model_path(name: str) -> Path:
    """Path of ``light_<name>.onnx`` in the installed onnx package's backend test data."""
    onnx = _onnx()
    path = Path(os.path.dirname(onnx.__file__)) / "backend" / "test" / "data" / "light" / f"light_{name}.onnx"
    if not path.exists():
        raise ModelError(f"light model {name!r} not found at {path}; known: {', '.join(LIGHT_MODELS)}")
    return path


def light_model(name: str, seed: int = 0):
    """A light zoo CNN with every ``ConstantOfShape`` weight replaced by a random initializer.

    Conv/Gemm weights get ``N(0, 1/fan_in)``-style values, batch-norm scales and variances values
    in [0.5, 1.5], everything else small values, so activations stay O(1) through the network.
    Initializer entries are dropped from ``graph.input`` (IR 3 files list them there), the
    ``__SHAPE`` helper initializers are removed and the IR version is raised to 9.
    """
    onnx = _onnx()
    from onnx import numpy_helper  # pylint: disable=import-outside-toplevel

    model = onnx.load(str(light_model_path(name)))
    rng = np.random.default_rng(seed)
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    # how each produced tensor is consumed: (op_type, input index)
    uses: dict[str, list[tuple[str, int]]] = {}
    for n in g.node:
        for k, t in enumerate(n.input):
            uses.setdefault(t, []).append((n.op_type, k))
    new_inits = []
    keep_nodes = []
    dropped = set()
    for n in g.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in inits:
            keep_nodes.append(n)
            continue
        shape = tuple(int(s) for s in inits[n.input[0]])
        out = n.output[0]
        use = uses.get(out, [("", -1)])[0]
        if use[0] in ("Conv", "Gemm") and use[1] == 1:
            fan_in = int(np.prod(shape[1:])) if use[0] == "Conv" else int(shape[-1])
            arr = rng.standard_normal(shape) * np.sqrt(1.0 / max(fan_in, 1))
        elif use[0] == "BatchNormalization" and use[1] in (1, 4):
            arr = rng.uniform(0.5, 1.5, shape)
        else:
            arr = rng.standard_normal(shape) * 0.05
        new_inits.append(_init(out, arr.astype(np.float32)))
        dropped.add(n.input[0])
    kept_inits = [i for i in g.initializer if i.name not in dropped]
    del g.node[:]
    g.node.extend(keep_nodes)
    del g.initializer[:]
    g.initializer.extend(kept_inits + new_inits)
    init_names = {i.name for i in g.initializer}
    real_inputs = [i for i in g.input if i.name not in init_names and i.name not in dropped]
    del g.input[:]
    g.input.extend(real_inputs)
    model.ir_version = IR_VERSION
    return model
