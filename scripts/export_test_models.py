#!/usr/bin/env python
"""Export tiny random-weight transformer models to ONNX for cachefit's tests.

Builds GPT-2, Llama (grouped-query attention), BERT and a Mixtral-style mixture of experts from
``transformers`` config objects (random weights from a fixed seed, nothing downloaded), exports each
with both torch.onnx exporters (``dynamo=True`` and the legacy TorchScript one, ``dynamo=False``),
and writes ``tests/data/<family>_<exporter>.onnx`` plus ``tests/data/models.json`` describing them.

Run by hand, never in CI (the test suite reads only the committed files and needs no torch)::

    pip install torch==2.13.0                       # CPU wheel
    pip install transformers onnxscript --no-deps   # then the light deps they name:
    pip install onnx-ir huggingface-hub safetensors tokenizers tqdm typer
    python scripts/export_test_models.py [--out tests/data] [--only gpt2,llama]

Every file has static shapes, a single graph input ``input_ids`` (int64) and a single output
(``logits`` for the causal language models, ``last_hidden_state`` for BERT), weights inline (one
file, no external data), and an ONNX IR version of at most 9 (onnxruntime refuses IR > 13).

Layer names recorded in models.json follow one convention for every family:
``embed`` (token and position embeddings), ``layers.<i>`` (transformer block i), ``head`` (final
norm and language-model head; BERT, exported without pooler, has none).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

log = logging.getLogger("export_test_models")

SEED = 0
MAX_IR_VERSION = 9
LEGACY_OPSET = 17
DYNAMO_OPSET = 18
MAX_FILE_BYTES = 5 * 1024 * 1024
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
# Python stack traces name files on the exporting machine: dropped to keep the files portable and
# reproducible. Every other metadata key the dynamo exporter writes is kept.
DROPPED_METADATA = {"pkg.torch.onnx.stack_trace"}


@dataclass
class ModelSpec:
    """One tiny model: how to build it, its input shape and what layer discovery should find."""

    family: str
    build: Callable[[], Any]
    batch: int
    seq: int
    num_blocks: int
    has_embed: bool
    has_head: bool
    output_name: str
    output_field: str
    # Module paths (as in ``model.named_modules()``) that make up each cachefit layer.
    embed_modules: list[str]
    block_module: str  # e.g. "model.layers" -> blocks "model.layers.0", ...
    head_modules: list[str]
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        names = ["embed"] if self.has_embed else []
        names += [f"layers.{i}" for i in range(self.num_blocks)]
        if self.has_head:
            names.append("head")
        return names

    def module_to_layer(self) -> dict[str, str]:
        """Module path prefix -> cachefit layer name."""
        mapping = {m: "embed" for m in self.embed_modules}
        mapping.update({f"{self.block_module}.{i}": f"layers.{i}" for i in range(self.num_blocks)})
        mapping.update({m: "head" for m in self.head_modules})
        return mapping


def _seeded(fn: Callable[[], Any]) -> Callable[[], Any]:
    def build():
        import torch

        torch.manual_seed(SEED)
        model = fn()
        model.eval()
        # Fresh initialisation leaves every norm weight at 1 and every bias at 0: identical
        # tensors that the legacy exporter deduplicates into Identity nodes, and values under
        # which a bug in bias or norm handling cannot show. Perturb every parameter.
        gen = torch.Generator().manual_seed(SEED + 2)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.02)
        return model

    return build


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=3, n_head=4, n_inner=128,
        use_cache=False, attn_implementation="eager", tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, attn_implementation="eager", tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, attn_implementation="eager",
    )
    return BertModel(cfg, add_pooling_layer=False)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64, use_cache=False, attn_implementation="eager",
        tie_word_embeddings=False, experts_implementation=MIXTRAL_EXPERTS,
    )
    return MixtralForCausalLM(cfg)


# Static-shape expert dispatch (gathers each token's top-k expert weights and runs batched matmuls):
# exportable by both exporters without data-dependent loops.
MIXTRAL_EXPERTS = "batched_mm"

SPECS: dict[str, ModelSpec] = {
    "gpt2": ModelSpec(
        family="gpt2", build=_seeded(_gpt2), batch=1, seq=16, num_blocks=3, has_embed=True,
        has_head=True, output_name="logits", output_field="logits",
        embed_modules=["transformer.wte", "transformer.wpe", "transformer.drop"],
        block_module="transformer.h", head_modules=["transformer.ln_f", "lm_head"],
        notes={"tied_embeddings": True},
    ),
    "llama": ModelSpec(
        family="llama", build=_seeded(_llama), batch=1, seq=16, num_blocks=4, has_embed=True,
        has_head=True, output_name="logits", output_field="logits",
        embed_modules=["model.embed_tokens", "model.rotary_emb"],
        block_module="model.layers", head_modules=["model.norm", "lm_head"],
        notes={"tied_embeddings": False, "num_attention_heads": 4, "num_key_value_heads": 2},
    ),
    "bert": ModelSpec(
        family="bert", build=_seeded(_bert), batch=2, seq=16, num_blocks=2, has_embed=True,
        has_head=False, output_name="last_hidden_state", output_field="last_hidden_state",
        embed_modules=["embeddings"], block_module="encoder.layer", head_modules=[],
        notes={"pooler": False},
    ),
    "mixtral": ModelSpec(
        family="mixtral", build=_seeded(_mixtral), batch=1, seq=16, num_blocks=2, has_embed=True,
        has_head=True, output_name="logits", output_field="logits",
        embed_modules=["model.embed_tokens", "model.rotary_emb"],
        block_module="model.layers", head_modules=["model.norm", "lm_head"],
        notes={
            "tied_embeddings": False, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 4, "num_experts_per_tok": 2, "experts_implementation": MIXTRAL_EXPERTS,
        },
    ),
}


def _export_target(model, spec: ModelSpec):
    """The nn.Module handed to torch.onnx: the model itself, whose forward returns one tensor."""
    import torch

    field_name = spec.output_field
    original_forward = model.forward

    def forward(input_ids):
        out = original_forward(input_ids=input_ids, use_cache=False) if spec.family != "bert" \
            else original_forward(input_ids=input_ids)
        return getattr(out, field_name)

    target = copy.copy(model)  # shallow: shares parameters and submodules, own forward
    target.forward = forward
    assert isinstance(target, torch.nn.Module)
    return target


def _drop_metadata(node: onnx.NodeProto, keys: set[str]) -> None:
    kept = [p for p in node.metadata_props if p.key not in keys]
    del node.metadata_props[:]
    node.metadata_props.extend(kept)


def _lower_ir_version(proto: onnx.ModelProto) -> onnx.ModelProto:
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
    return proto


@contextlib.contextmanager
def _no_packed_sequence_check():
    """Skip transformers' packed-sequence detection while tracing for the legacy exporter.

    Without an attention mask, transformers 5 looks for packed sequences in ``position_ids`` with
    ``torch.diff``, which the TorchScript exporter cannot translate (``aten::diff``). Our position
    ids are always ``arange(seq)``, for which the detection returns None anyway.
    """
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _export(model, spec: ModelSpec, input_ids, dynamo: bool) -> onnx.ModelProto:
    import torch

    target = _export_target(model, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(
                target, (input_ids,), dynamo=True, opset_version=DYNAMO_OPSET,
                input_names=["input_ids"], output_names=[spec.output_name], optimize=True,
                external_data=False,
            )
            proto = program.model_proto
            for node in proto.graph.node:
                _drop_metadata(node, DROPPED_METADATA)
        else:
            with tempfile.TemporaryDirectory() as tmp, _no_packed_sequence_check():
                path = os.path.join(tmp, "model.onnx")
                torch.onnx.export(
                    target, (input_ids,), path, dynamo=False, opset_version=LEGACY_OPSET,
                    input_names=["input_ids"], output_names=[spec.output_name],
                    do_constant_folding=True,
                )
                proto = onnx.load(path)
    return _lower_ir_version(proto)


def _scope_of(node: onnx.NodeProto, dynamo: bool) -> str | None:
    """Innermost module path of a node, e.g. ``model.layers.0.self_attn.q_proj``.

    dynamo: ``metadata_props['pkg.torch.onnx.name_scopes']`` is a Python-repr list of module paths,
    outermost first, whose last entry is the FX node name (``"['', 'model', 'model.layers.0', ...,
    'model.layers.0.self_attn.q_proj', 'linear']"``). legacy: the node name is
    ``/model/layers.0/self_attn/q_proj/MatMul`` (module attribute names between slashes, then the
    op name with an optional ``_<n>`` suffix).
    """
    if dynamo:
        for prop in node.metadata_props:
            if prop.key == SCOPE_KEY:
                scopes = _parse_list(prop.value)[:-1]  # drop the FX node name
                return scopes[-1] if scopes else ""
        return None
    if not node.name.startswith("/"):
        return None
    parts = node.name.split("/")[1:-1]
    return ".".join(parts)


def _parse_list(value: str) -> list[str]:
    try:
        parsed = json.loads(value)
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    except json.JSONDecodeError:
        pass
    import ast

    try:
        parsed = ast.literal_eval(value)
        if isinstance(parsed, (list, tuple)):
            return [str(v) for v in parsed]
    except (ValueError, SyntaxError):
        pass
    return [value]


def _layer_of(scope: str | None, mapping: dict[str, str]) -> str | None:
    if not scope:
        return None
    best = None
    for prefix, layer in mapping.items():
        if scope == prefix or scope.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return best[1] if best else None


def _describe(proto: onnx.ModelProto, spec: ModelSpec, dynamo: bool, path: Path) -> dict[str, Any]:
    graph = proto.graph
    init_names = {i.name for i in graph.initializer}
    mapping = spec.module_to_layer()
    per_layer: Counter[str] = Counter()
    unscoped = 0
    unscoped_examples: list[str] = []
    for node in graph.node:
        scope = _scope_of(node, dynamo)
        layer = _layer_of(scope, mapping)
        if layer is None:
            unscoped += 1
            if len(unscoped_examples) < 12:
                unscoped_examples.append(f"{node.op_type} {node.name} (module {scope!r})")
        else:
            per_layer[layer] += 1
    found_order = [l for l in spec.layers if per_layer[l] > 0]
    missing = [l for l in spec.layers if per_layer[l] == 0]
    if missing:
        log.warning("%s: no node scoped to layers %s", path.name, missing)

    examples = _examples(proto, dynamo)
    elem = onnx.helper.tensor_dtype_to_np_dtype

    def io(values):
        return [
            {
                "name": v.name,
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim],
                "dtype": str(np.dtype(elem(v.type.tensor_type.elem_type))),
            }
            for v in values
        ]

    return {
        "file": path.name,
        "family": spec.family,
        "exporter": "dynamo" if dynamo else "legacy",
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ir_version": proto.ir_version,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "num_blocks": spec.num_blocks,
        "has_embedding": spec.has_embed,
        "has_head": spec.has_head,
        "inputs": io([i for i in graph.input if i.name not in init_names]),
        "outputs": io(graph.output),
        "layers": spec.layers,
        "layer_modules": {
            "embed": spec.embed_modules,
            "layers.<i>": f"{spec.block_module}.<i>",
            "head": spec.head_modules,
        },
        "scope_format": (
            f"node.metadata_props['{SCOPE_KEY}']: Python-repr list of module paths, outermost first, "
            "the last entry being the FX node name, e.g. \"['', 'model', 'model.layers.0', "
            "'model.layers.0.self_attn', 'model.layers.0.self_attn.q_proj', 'linear']\"; "
            "node names are plain (node_linear, node_MatMul_42)"
            if dynamo else
            "node.name: '/<module>/<path>/<op>' with '/' between module attribute names "
            "(e.g. /model/layers.0/self_attn/q_proj/MatMul); module path = name parts 1..-1 joined by '.'"
        ),
        "num_nodes": len(graph.node),
        "num_initializers": len(graph.initializer),
        "nodes_per_layer": {l: per_layer[l] for l in spec.layers},
        "nodes_without_layer": unscoped,
        "nodes_without_layer_examples": unscoped_examples,
        "layers_with_nodes": found_order,
        "scope_examples": examples,
        "notes": spec.notes,
    }


def _examples(proto: onnx.ModelProto, dynamo: bool, count: int = 4) -> list[dict[str, Any]]:
    picked = []
    wanted = [r"MatMul|Gemm", r"Gather", r"Softmax", r"Add"]
    for pattern in wanted:
        for node in proto.graph.node:
            if re.fullmatch(pattern, node.op_type) and (dynamo or node.name.startswith("/")):
                entry = {"op_type": node.op_type, "name": node.name}
                if dynamo:
                    entry["metadata_props"] = {p.key: p.value for p in node.metadata_props}
                picked.append(entry)
                break
        if len(picked) >= count:
            break
    return picked


def _check_runs(proto: onnx.ModelProto, spec: ModelSpec, input_ids, reference: np.ndarray, name: str) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input_ids": input_ids.numpy()})
    err = float(np.max(np.abs(out - reference)))
    if not np.all(np.isfinite(out)) or err > 1e-3:
        raise RuntimeError(f"{name}: onnxruntime output differs from torch by {err:.3g}")
    return err


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "data")
    parser.add_argument("--only", default="", help="comma-separated families (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    torch.manual_seed(SEED)
    families = [f for f in args.only.split(",") if f] or list(SPECS)
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "models.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"models": []}
    entries = {e["file"]: e for e in index["models"]}

    for family in families:
        spec = SPECS[family]
        model = spec.build()
        gen = torch.Generator().manual_seed(SEED + 1)
        input_ids = torch.randint(0, 256, (spec.batch, spec.seq), generator=gen, dtype=torch.int64)
        with torch.no_grad():
            reference = _export_target(model, spec)(input_ids).numpy()
        for dynamo in (True, False):
            name = f"{family}_{'dynamo' if dynamo else 'legacy'}.onnx"
            path = args.out / name
            with torch.no_grad():
                proto = _export(model, spec, input_ids, dynamo)
            onnx.checker.check_model(proto)
            err = _check_runs(proto, spec, input_ids, reference, name)
            onnx.save_model(proto, path, save_as_external_data=False)
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise RuntimeError(f"{name}: {size} bytes, over the {MAX_FILE_BYTES} byte limit")
            entry = _describe(proto, spec, dynamo, path)
            entry["max_abs_err_vs_torch"] = err
            entries[name] = entry
            log.info("%s: %d bytes, %d nodes, nodes per layer %s, unscoped %d, |ort-torch| %.2g",
                     name, size, entry["num_nodes"], entry["nodes_per_layer"], entry["nodes_without_layer"], err)

    index = {
        "generator": "scripts/export_test_models.py",
        "seed": SEED,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "onnx": onnx.__version__,
        "layer_naming": "embed = token/position embeddings; layers.<i> = transformer block i; "
                        "head = final norm + lm head (absent for BERT without pooler)",
        "models": [entries[k] for k in sorted(entries)],
    }
    index_path.write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
