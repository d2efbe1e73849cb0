"""Which checkpoint a stage resumes from, and making the files on disk agree with it (driver side).

Ray Train's record of a run (the checkpoints its controller registered after the copy into
``<storage>/<run name>/step_N``) is the one source of truth for "the latest checkpoint": it is what
``ray.train.get_checkpoint()`` hands the workers on a rerun, so the driver reads the same record
(:func:`read_run_record`) for the data position, for "already finished" and for the export. A
``kill -9`` during a save can leave a newer ``step_N`` folder that Ray never recorded, metrics lines
after the recorded step, a missing export or a half-copied one; :func:`agree_with_record` deletes or
repairs those before a rerun, so the model, the optimizer state, the data position, metrics.jsonl
and the exported models all come from the same recorded checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat.checkpoint import META_FILE, CheckpointError, copy_checkpoint, prune_checkpoints, step_of
from nanochat.common import atomic_write_text, get_logger
from nanochat.train.checkpointing import models_in

log = get_logger(__name__)


@dataclass
class Recorded:
    """One checkpoint in Ray's record: the ``ray.train.Checkpoint`` and the metrics reported with it."""

    checkpoint: Any
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        return self.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def step(self) -> int:
        return int(self.metrics["step"]) if "step" in self.metrics else step_of(self.name)


def storage_root(storage: str) -> str:
    """A run storage location as given to Ray Train: local paths made absolute, URIs (``s3://``) kept."""
    return storage.rstrip("/") if "://" in storage else str(Path(storage).expanduser().resolve())


def run_path(storage: str, name: str) -> str:
    """``<storage>/<name>``: the folder (or URI) of one Ray Train run."""
    return f"{storage_root(storage)}/{name}"


def _fs(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def read_run_record(path: str) -> list[Recorded]:
    """The checkpoints Ray Train recorded for the run at ``path``, oldest first ([] when none).

    Read with the public ``ray.train.Result.from_path`` (Ray 2.60: the Train controller's
    ``checkpoint_manager_snapshot.json``, rewritten after every registered checkpoint).

    Raises:
        CheckpointError: the record cannot be used (it lists a deleted checkpoint, or was written by
            another Ray version); the message says to start over with ``--restart``.
    """
    import logging

    import ray.train

    # Reading the record logs Ray's long "run snapshot found" notice; the Train controller logs it as well.
    announcer = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    try:
        result = ray.train.Result.from_path(path)
    except RuntimeError:  # no run folder, or no checkpoint recorded in it yet
        return []
    except Exception as err:  # noqa: BLE001 - Ray's own initialization errors, surfaced with the fix
        raise CheckpointError(f"cannot resume from {path}: {err}; start over with --restart") from None
    finally:
        announcer.setLevel(level)
    return [Recorded(ckpt, dict(metrics)) for ckpt, metrics in result.best_checkpoints or []]


def forget_run(path: str, stage_dir: Path) -> None:
    """Start a stage/tag over: delete its Ray run folder (local or remote), metrics, summary and exports."""
    import pyarrow.fs

    fs, fs_path = _fs(path)
    if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(fs_path)
    for name in ("metrics.jsonl", "summary.json"):
        (stage_dir / name).unlink(missing_ok=True)
    for old in [*stage_dir.glob("step_*"), *stage_dir.glob(".step_*")]:
        shutil.rmtree(old, ignore_errors=True)


def _drop_unrecorded_folders(path: str, record: list[Recorded]) -> None:
    """Delete ``step_N`` folders of a run that Ray never recorded (a crash between copy and record)."""
    import pyarrow.fs

    fs, fs_path = _fs(path)
    keep = {r.name for r in record}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(fs_path, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.Directory and step_of(info.base_name) >= 0 and info.base_name not in keep:
            log.info("deleting %s: Ray never recorded this checkpoint (the save was interrupted)", info.path)
            fs.delete_dir(info.path)


def metrics_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """One metrics.jsonl line from one report: the metrics, greedy ``samples`` last (when any)."""
    samples = metrics.get("samples")
    return {**{k: v for k, v in metrics.items() if k != "samples"}, **({"samples": samples} if samples else {})}


def _rewind_metrics(metrics_path: Path, latest: Recorded) -> None:
    """Keep metrics.jsonl up to the recorded step; that step's line is Ray's recorded one."""
    from nanochat.train.metrics import read_jsonl

    if not metrics_path.exists():
        return
    kept = [r for r in read_jsonl(metrics_path) if int(r.get("step", -1)) < latest.step]
    kept.append(metrics_record(latest.metrics))
    atomic_write_text(metrics_path, "".join(json.dumps(r, default=str) + "\n" for r in kept))


def export_checkpoint(checkpoint, stage_dir: Path, keep: int, overwrite: bool = True) -> Path | None:
    """Copy a recorded checkpoint's model to ``stage_dir/step_N``, then keep the newest ``keep`` there.

    Returns the exported folder (None when the checkpoint holds no model). ``overwrite=False`` keeps
    an export that is already complete (its meta.json exists; copies are atomic).
    """
    exported = None
    with checkpoint.as_directory() as d:
        for src in models_in(d):
            exported = stage_dir / src.name
            if overwrite or not (exported / META_FILE).exists():
                copy_checkpoint(src, exported)
    prune_checkpoints(stage_dir, keep)
    return exported


def agree_with_record(
    path: str, record: list[Recorded], stage_dir: Path, metrics_path: Path, keep: int, export: bool
) -> None:
    """Make the run folder, metrics.jsonl and the exports agree with Ray's record before a rerun.

    Deletes unrecorded ``step_N`` folders of the run, metrics lines after the latest recorded step
    (and writes that step's recorded line), exports past it and leftover temp copies of exports
    (``.step_N.tmp-*``); exports the latest recorded checkpoint when the crash came before its export.
    """
    latest = record[-1]
    _drop_unrecorded_folders(path, record)
    _rewind_metrics(metrics_path, latest)
    for old in stage_dir.glob(".step_*"):  # an export interrupted mid-copy (atomic_directory's temp)
        shutil.rmtree(old, ignore_errors=True)
    for newer in stage_dir.glob("step_*"):
        if step_of(newer) > latest.step:
            shutil.rmtree(newer, ignore_errors=True)
    if export:
        export_checkpoint(latest.checkpoint, stage_dir, keep, overwrite=False)
