"""DeepSpeed's compiled ops, loaded so that a builder killed mid-load can never hang a later run.

torch builds and loads a JIT extension under a lock *file*, ``<extensions dir>/<op>/lock``, that it
creates with ``O_EXCL`` and removes when done; a process killed while holding it (``kill -9``, the
OOM killer, a lost node, a test's kill at a save phase) leaves it behind, and every later load then
waits for it forever (``torch.utils.file_baton.FileBaton.wait`` has no timeout). On CPU every
DeepSpeed process group loads ``deepspeed_shm_comm``, so one such kill hung every later training
run on the machine.

:func:`load_compiled_ops` loads the ops a run needs before ``deepspeed.initialize`` does, holding an
``flock`` of its own that the kernel releases when its holder dies. Every nanochat process that
builds takes that flock first, so a torch lock file found while holding it, older than a no-op load
ever takes, was left by a dead process and is removed (with a warning).
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

STALE_AFTER_S = 60.0  # a no-op load holds torch's lock for well under a second; a build happens under our flock


def load_compiled_ops(builders: Sequence[str] = ("ShareMemCommBuilder",)) -> list[str]:
    """Build (the first time, ~30-50 s on 2 cores) or load each DeepSpeed op named, for this accelerator.

    ``builders``: DeepSpeed op-builder class names (``ShareMemCommBuilder`` for CPU collectives,
    ``CPUAdamBuilder`` for DeepSpeed's CPU AdamW). Ops the accelerator has no builder for, or that are
    incompatible here, are skipped. Returns the names of the ops loaded. Raises whatever the build
    raises (a compiler error is not hidden).
    """
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    loaded = []
    for name in builders:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            continue
        build_dir = Path(_get_build_directory(builder.name, verbose=False))
        with open(build_dir.parent / f".{builder.name}.nanochat-lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if we die
            clear_stale_lock(build_dir / "lock")
            builder.load(verbose=False)
        loaded.append(builder.name)
    return loaded


def clear_stale_lock(lock: Path, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Wait while torch's build lock file ``lock`` is younger than ``stale_after_s``, then remove it.

    Returns True if a stale lock was removed, False if there was none (or its holder finished).
    Call only while holding the op's flock (:func:`load_compiled_ops`): then nobody of ours is
    building, a lock still there after ``stale_after_s`` is a dead process's.
    """
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= stale_after_s:
            break
        time.sleep(0.5)
    logger.warning("removing %s, left %.0f s ago by a process killed while loading a compiled op", lock, age)
    lock.unlink(missing_ok=True)
    return True
