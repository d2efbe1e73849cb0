"""A test seam: kill -9 a training job at a named phase of a checkpoint save.

``NANOCHAT_DEBUG_KILL_AT=<phase>:<step>`` makes the process that reaches ``phase`` while saving
step ``step`` SIGKILL the job's driver (the process that called ``train_stage``) and then itself,
as a ``kill -9`` of the job landing at that instant would; Ray then ends the rest of the dead job
(Train controller, workers, data actors, placement groups). It exists so that tests can show a
crash at any point of a save resumes correctly (tests/test_train_resume.py); unset, nothing
happens. The variable is read once, on the driver, by :func:`kill_point`, and travels to the
workers and the Train controller with the run's config.

The phases of one save, in order (N = the step):

- ``before_copy`` (worker, rank 0): the checkpoint is written to a local temp folder only.
- ``after_copy`` (worker, rank 0): ``<run dir>/step_N`` is complete, but Ray has not recorded it
  (its run state, ``checkpoint_manager_snapshot.json``, does not list it yet).
- ``after_record`` (Train controller): Ray recorded it; metrics.jsonl and the export lag behind.
- ``before_export`` (Train controller): the metrics line is written; the model is not exported yet.
- ``after_export`` (Train controller): ``checkpoints/<stage>/<tag>/step_N`` is written.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENV = "NANOCHAT_DEBUG_KILL_AT"
PHASES = ("before_copy", "after_copy", "after_record", "before_export", "after_export")


@dataclass(frozen=True)
class KillPoint:
    phase: str
    step: int
    driver_pid: int


def kill_point() -> KillPoint | None:
    """The kill point named by ``$NANOCHAT_DEBUG_KILL_AT`` for a job driven by this process (None: unset).

    Raises:
        ValueError: the value is not ``<phase>:<step>`` with a phase from :data:`PHASES`.
    """
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    phase, _, step = raw.partition(":")
    if phase not in PHASES or not step.isdigit():
        raise ValueError(f"{ENV}={raw!r}: expected <phase>:<step> with phase one of {', '.join(PHASES)}")
    return KillPoint(phase, int(step), os.getpid())


def kill_if_due(point: KillPoint | None, phase: str, step: int) -> None:
    """SIGKILL the job's driver, then this process, when ``point`` is ``phase`` at ``step`` (else a no-op)."""
    if point is None or (point.phase, point.step) != (phase, step):
        return
    if point.driver_pid != os.getpid():
        try:
            os.kill(point.driver_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_copy(point: KillPoint | None, step: int) -> dict:
    """``ray.train.report`` kwargs for the ``after_copy`` kill point ({} for any other): Ray's own copy, then the kill.

    Ray records a checkpoint in the controller after the worker's copy, so the end of the copy is
    the one moment a folder exists in the run dir that Ray's record does not list.
    """
    if point is None or (point.phase, point.step) != ("after_copy", step):
        return {}
    import ray.train

    def upload(checkpoint, dir_name: str):
        persisted = ray.train.get_context().get_storage().persist_current_checkpoint(checkpoint, dir_name)
        kill_if_due(point, "after_copy", step)
        return persisted

    return {"checkpoint_upload_fn": upload}
