"""cachefit's Relax passes, one per file (``verb_noun.py``, class named as the file in CamelCase).

TVM's pass infrastructure turns any Python exception raised inside a pass into a plain
``RuntimeError``; :func:`keeps_errors` and :func:`run_pass` carry cachefit's own error types across
it, so a user's bad input still ends as one clear :class:`~cachefit.errors.CachefitError`.
"""

from __future__ import annotations

import functools
import threading

import tvm_ffi

from .. import errors as _errors
from ..errors import CachefitError

# Errors raised inside a pass cross TVM's FFI; registered classes come back as themselves
# (``keeps_errors``/``run_pass`` below also cover a class registered under another name).
for _cls in vars(_errors).values():
    if isinstance(_cls, type) and issubclass(_cls, CachefitError):
        try:
            tvm_ffi.register_error(_cls)
        except Exception:  # already registered (e.g. by name) - keep the first registration
            pass

_pending = threading.local()


def keeps_errors(method):
    """Decorate a pass's ``transform_module`` so that a CachefitError it raises survives TVM."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except CachefitError as exc:
            _pending.error = exc
            raise

    return wrapper


def run_pass(pass_obj, mod):
    """Apply a pass (or a Sequential); re-raise a CachefitError from inside it as itself."""
    _pending.error = None
    try:
        return pass_obj(mod)
    except CachefitError:
        raise
    except Exception as exc:
        err = getattr(_pending, "error", None)
        _pending.error = None
        if err is not None and str(err).splitlines()[0] in str(exc):
            raise err from None
        raise
