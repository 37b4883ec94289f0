"""CPU placement of pipeline workers: which cores each stage's thread owns, and TVM's thread pool to match.

TVM's parallel runtime keeps one thread pool per calling thread. A stage's worker thread pins itself
to its cores (``sched_setaffinity`` on its own thread id) and sizes its TVM pool to the same number of
threads, each pinned to one of those cores, so that two stages on two cores never compete for one.
Linux only for pinning; elsewhere workers run unpinned (logged once).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Sequence

from ..errors import CachefitError

logger = logging.getLogger(__name__)

# TVM's ThreadGroup::AffinityMode: one worker thread per listed core.
_SPECIFY_ONE_CORE_PER_THREAD = -2


def available_cores() -> list[int]:
    """The cores this process may run on (its affinity mask), sorted."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def parse_cores(text: str | None) -> list[tuple[int, ...]] | None:
    """``"0;1"`` or ``"0,1;2,3"`` (one group per stage, ``;`` between stages, ``,`` or ``a-b`` inside)
    -> ``[(0,), (1,)]``; ``None``/``"auto"`` -> ``None`` (automatic); ``"none"`` -> ``[]`` (no pinning)."""
    if text is None or str(text).strip().lower() in ("", "auto"):
        return None
    text = str(text).strip().lower()
    if text in ("none", "off"):
        return []
    groups = []
    for part in text.split(";"):
        cores: list[int] = []
        for item in part.split(","):
            item = item.strip()
            if not item:
                continue
            try:
                if "-" in item:
                    lo, hi = (int(v) for v in item.split("-", 1))
                    cores.extend(range(lo, hi + 1))
                else:
                    cores.append(int(item))
            except ValueError:
                raise CachefitError(f"malformed core list {text!r}: write one group per stage separated by ';', "
                                    "cores inside a group by ',' or as a range, e.g. '0;1' or '0-1;2-3'") from None
        if not cores:
            raise CachefitError(f"core list {text!r} has an empty group; give at least one core per stage")
        groups.append(tuple(sorted(set(cores))))
    return groups


def plan_cores(num_stages: int, cores: Sequence[Sequence[int]] | None = None,
               available: Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """One tuple of cores per stage.

    cores: explicit groups (one per stage; a single group is given to every stage), or ``None`` for
           automatic placement: the available cores split into ``num_stages`` contiguous equal groups
           when there are enough of them, else stage ``i`` on core ``i mod n`` (stages then share
           cores, and the pipeline cannot run faster than one core's worth per shared core).
    """
    avail = list(available) if available is not None else available_cores()
    if num_stages < 1:
        raise CachefitError("a pipeline needs at least one stage")
    if cores is not None:
        groups = [tuple(int(c) for c in g) for g in cores]
        if len(groups) == 1:
            groups = groups * num_stages
        if len(groups) != num_stages:
            raise CachefitError(f"{len(groups)} core groups given for {num_stages} stages; give one group per stage "
                                "(e.g. '0;1;2') or a single group for all of them")
        bad = sorted({c for g in groups for c in g} - set(avail))
        if bad:
            raise CachefitError(f"core(s) {bad} are not available to this process (available: {avail}); "
                                "pick cores from that list")
        return groups
    n = len(avail)
    if n >= num_stages:
        per = n // num_stages
        return [tuple(avail[i * per:(i + 1) * per]) for i in range(num_stages)]
    logger.warning("%d stages on %d cores: stages share cores (stage i on core i mod %d)", num_stages, n, n)
    return [(avail[i % n],) for i in range(num_stages)]


_warned_no_affinity = False


def pin_current_thread(cores: Sequence[int]) -> bool:
    """Pin the calling thread to ``cores`` and size the calling thread's TVM pool to ``len(cores)``
    threads, one per core. Returns False where pinning is not supported (the pool is still sized)."""
    global _warned_no_affinity
    cores = [int(c) for c in cores]
    config_tvm_threads(len(cores), cores)
    if not hasattr(os, "sched_setaffinity"):
        if not _warned_no_affinity:
            logger.warning("this platform cannot pin threads to cores; pipeline workers run unpinned")
            _warned_no_affinity = True
        return False
    # TVM's pool configuration moves the calling thread; set the mask it must have last.
    os.sched_setaffinity(threading.get_native_id(), set(cores))
    return True


def config_tvm_threads(num_threads: int, cores: Sequence[int] | None = None) -> None:
    """Size the calling thread's TVM thread pool (``runtime.config_threadpool``): ``num_threads``
    threads, one per core of ``cores``; with no cores the calling thread keeps its affinity mask
    (TVM would otherwise move it to core 0)."""
    import tvm

    fn = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if fn is None:  # pragma: no cover - present in every TVM 0.2x wheel
        logger.warning("this TVM has no runtime.config_threadpool; its thread pool keeps its default size")
        return
    before = current_thread_cores()
    fn(_SPECIFY_ONE_CORE_PER_THREAD, int(num_threads), [str(int(c)) for c in cores] if cores else [])
    if not cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(threading.get_native_id(), before)


def current_thread_cores() -> set[int]:
    """The affinity mask of the calling thread."""
    if not hasattr(os, "sched_getaffinity"):
        return set(available_cores())
    return set(os.sched_getaffinity(threading.get_native_id()))
