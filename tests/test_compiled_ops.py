"""A compiled-op build lock left by a killed process never hangs a later run (nanochat/train/compiled_ops.py)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from nanochat.ray_utils import worker_env
from nanochat.train.compiled_ops import clear_stale_lock, load_compiled_ops


def _aged(path: Path, seconds: float) -> Path:
    path.touch()
    os.utime(path, (time.time() - seconds,) * 2)
    return path


def test_an_old_lock_is_removed_and_a_missing_one_is_left_alone(tmp_path):
    assert clear_stale_lock(_aged(tmp_path / "lock", 3600)) is True
    assert not (tmp_path / "lock").exists()
    assert clear_stale_lock(tmp_path / "lock") is False


def test_a_young_lock_is_waited_for_while_its_holder_may_still_finish(tmp_path):
    lock = _aged(tmp_path / "lock", 0)
    threading.Timer(0.5, lock.unlink).start()  # its holder finishes
    assert clear_stale_lock(lock, stale_after_s=30) is False
    lock = _aged(tmp_path / "lock", 0)  # its holder died: removed once it is old enough
    start = time.monotonic()
    assert clear_stale_lock(lock, stale_after_s=1.0) is True
    assert 0.9 <= time.monotonic() - start < 10 and not lock.exists()


def test_the_shm_op_loads_although_a_killed_process_left_its_build_lock(monkeypatch):
    """The CI hang: a lock file from a killed loader made every later DeepSpeed init wait forever."""
    env = worker_env()
    monkeypatch.setenv("DS_ACCELERATOR", env.get("DS_ACCELERATOR", "cpu"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import _get_build_directory

    lock = _aged(Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock", 3600)
    result: list = []
    loader = threading.Thread(target=lambda: result.append(load_compiled_ops()), daemon=True)
    loader.start()
    loader.join(timeout=600)  # a first build takes ~30-50 s on 2 cores; a hang would never end
    assert result == [["deepspeed_shm_comm"]] and not lock.exists()
