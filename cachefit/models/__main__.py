"""``python -m cachefit.models NAME OUT.onnx [--vocab V] [--set key=value ...]``: write a reference model."""

from __future__ import annotations

import argparse
import sys

from ..errors import CachefitError
from .presets import FAMILY_DEFAULTS, PRESETS, export, num_params


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cachefit.models", description=__doc__)
    ap.add_argument("name", help=f"preset ({', '.join(PRESETS)}) or family ({', '.join(FAMILY_DEFAULTS)})")
    ap.add_argument("out", help="output .onnx path")
    ap.add_argument("--vocab", type=int, default=None, help="add an embedding (layer 'embed') and an LM head (layer 'head')")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a parameter (layers=2, dtype=float16, shape_only=true, ...)")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, val = item.partition("=")
        if not sep:
            ap.error(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = _value(val.strip())
    if args.vocab is not None:
        overrides["vocab"] = args.vocab
    try:
        path = export(args.name, args.out, **overrides)
        n = num_params(args.name, **overrides)
    except CachefitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({n:,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
