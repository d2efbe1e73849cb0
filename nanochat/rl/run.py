"""The ``rl`` stage's driver: N rollout actors and a learner on Ray Train + DeepSpeed (``TorchTrainer``).

:func:`train_rl` checks the request (an SFT checkpoint to start from, or an RL run of the tag to
resume), starts ``rl.num_rollout_actors`` rollout actors (:class:`~nanochat.rl.rollout.RolloutWorker`,
each holding an :class:`~nanochat.engine.Engine`) and runs the learner as a ``TorchTrainer`` with
``ray.num_workers`` workers (1 by default; data parallel beyond) whose train function
(:func:`nanochat.rl.loop.rl_loop_per_worker`) gets the actors' handles in its config: rank 0 drives
the rollouts, the weights broadcast and the staleness check step by step (see :mod:`nanochat.rl.loop`
and docs/rl.md for why rank 0 and not this driver). Metrics go to
``checkpoints/rl/<tag>/metrics.jsonl``, the end summary to ``summary.json``; checkpoints and resume are
the learner's (:mod:`nanochat.rl.learner`): a rerun continues at the saved step and weights version.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from nanochat.checkpoint import (
    CheckpointError,
    checkpoint_tag,
    checkpoints_root,
    find_latest,
    read_meta,
    resolve_checkpoint,
)
from nanochat.common import NanochatError, atomic_write_text, base_dir, get_logger, root_cause
from nanochat.config import Preset
from nanochat.progress import show_training
from nanochat.rl.loop import StalenessError, group_stats, pass_at_k, question_order, resume_point
from nanochat.rl.rewards import rl_tasks

__all__ = ["RLError", "RLResult", "StalenessError", "group_stats", "pass_at_k", "question_order",
           "resolve_source_checkpoint", "train_rl"]

log = get_logger("nanochat.rl")


class RLError(NanochatError):
    """The RL stage failed in the learner or a rollout actor; the message gives the root cause."""


@dataclass
class RLResult:
    checkpoint: str
    num_iterations: int
    wall_seconds: float
    metrics: dict[str, Any]
    summary_path: str


def resolve_source_checkpoint(spec: str | None, tag: str | None, base: Path) -> Path:
    """The SFT checkpoint RL starts from: ``--from`` (path or stage name) or the latest ``sft`` one (of ``tag``).

    Raises:
        CheckpointError: none found, or ``spec`` is not an SFT checkpoint (the message says what to run).
    """
    if spec:
        path = resolve_checkpoint(spec, base=base)
    else:
        try:
            path = find_latest("sft", tag, base)
        except CheckpointError:
            path = find_latest("sft", base=base)
    found = read_meta(path).get("stage")
    if found not in ("sft", "rl"):
        raise CheckpointError(f"refusing {path}: it is a '{found}' checkpoint, but rl starts from an 'sft' one; "
                              "pass --from an sft checkpoint (`nanochat train sft` makes one)")
    return path


def train_rl(preset: Preset, from_checkpoint: str | None = None, tag: str | None = None, restart: bool = False,
             stop_at_step: int | None = None, num_rollout_actors: int | None = None, num_workers: int | None = None,
             base: str | PathLike | None = None) -> RLResult:
    """Run (or resume) the RL stage; returns where its last checkpoint is and its final metrics.

    ``num_workers``: learner workers (default ``preset.ray.num_workers``); ``num_rollout_actors``:
    default ``rl.num_rollout_actors``.

    Raises:
        CheckpointError: no SFT checkpoint to start from (run ``nanochat train sft``).
        RLError: the learner or a rollout actor failed (e.g. a :class:`StalenessError`: a bug, not a setting).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from nanochat.ray_utils import cluster_has_gpus, init_ray, worker_env
    from nanochat.rl.rollout import RolloutWorker
    from nanochat.train.resume import run_path, storage_root

    base = base_dir(base)
    rl = preset.rl
    t_start = time.time()
    resume_from, state, source = None, {}, None
    if tag and not restart:
        resume_from, state = resume_point(checkpoints_root("rl", base) / tag, tag, base)
    if resume_from is None:
        source = resolve_source_checkpoint(from_checkpoint, tag, base)  # raises, naming the fix
        tag = tag or checkpoint_tag(source)
        if not restart:
            resume_from, state = resume_point(checkpoints_root("rl", base) / tag, tag, base)
    assert tag is not None
    tag_dir = checkpoints_root("rl", base) / tag
    if restart and tag_dir.is_dir():  # start over: the old run's checkpoints would otherwise be resumed later
        shutil.rmtree(tag_dir)
    train_task, _, _ = rl_tasks(rl.task, preset.mixture.source, base)
    num_iterations = rl.num_iterations if rl.num_iterations > 0 else len(train_task) // rl.questions_per_step
    step = int(state.get("step", 0))
    if resume_from is not None:
        log.info("rl/%s: resuming the latest checkpoint (step %d, weights v%d; --restart starts over)", tag, step,
                 int(state.get("weights_version", 0)))
    init_ray(num_cpus=preset.ray.num_cpus, base=base)
    gpu = bool(preset.ray.use_gpu if preset.ray.use_gpu is not None else cluster_has_gpus())
    n_actors = num_rollout_actors or rl.num_rollout_actors
    world = num_workers or preset.ray.num_workers
    env = worker_env(base)
    actors = [ray.remote(RolloutWorker).options(
        num_cpus=rl.rollout_cpus, num_gpus=1 if gpu else 0).remote(
        str(resume_from or source), rl.task, preset.mixture.source, str(base), rl.rollout_batch_size,
        None if gpu else max(1, int(rl.rollout_cpus))) for _ in range(n_actors)]
    config = {"preset": preset.model_dump(mode="json"), "tag": tag, "tag_dir": str(tag_dir), "base": str(base),
              "source": str(source) if source else None, "num_iterations": num_iterations,
              "stop_at_step": stop_at_step, "actors": actors,
              "threads": 1 if gpu else max(1, int(preset.ray.cpus_per_worker))}
    storage = storage_root(preset.ray.storage_path or str(base / "ray_results"))
    _forget_ray_run(run_path(storage, f"rl-{tag}"))
    trainer = TorchTrainer(
        _worker_entry, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=world, use_gpu=gpu, resources_per_worker={
            "CPU": preset.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}),
        run_config=ray.train.RunConfig(
            name=f"rl-{tag}", storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=preset.ray.max_failures),
            worker_runtime_env={"env_vars": env}),
    )
    log.info("rl/%s: %d steps, %d learner worker(s) (%s), %d rollout actor(s)", tag, num_iterations, world,
             "GPU" if gpu else "CPU", n_actors)
    try:
        with show_training("rl", tag_dir / "metrics.jsonl", num_iterations, start=step, line=lambda r: _progress_line(r, num_iterations)):
            trainer.fit()
    except Exception as err:  # noqa: BLE001 - surface the worker's error as one clear line
        raise RLError(f"rl failed: {root_cause(err)} (run dir {tag_dir}; rerun to resume from the latest "
                      "checkpoint)") from err
    finally:  # free the CPUs/GPUs they hold even when a step failed
        for handle in actors:
            ray.kill(handle)
    latest, state = resume_point(tag_dir, tag, base)
    step = int(state.get("step", 0))
    last = _last_record(tag_dir / "metrics.jsonl")
    wall = time.time() - t_start
    summary = {"stage": "rl", "tag": tag, "num_iterations": num_iterations, "step": step, "wall_seconds": wall,
               "learner_workers": world, "rollout_actors": n_actors, "checkpoint": str(latest) if latest else None,
               "source_checkpoint": str(source) if source else None, "final": last}
    summary_path = tag_dir / "summary.json"
    if step == num_iterations:
        atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return RLResult(str(latest) if latest else "", num_iterations, wall, last, str(summary_path))


def _forget_ray_run(path: str) -> None:
    """Delete Ray Train's folder of an earlier fit: it holds no resume point (the learner never reports a
    checkpoint to Ray: checkpoints/rl/<tag> is the record), and Train must not take it for one."""
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(fs_path)


def _progress_line(record: dict[str, Any], total: int) -> str:
    """One console line per metrics record (rank 0 of the learner writes them; its own log stays in Ray's logs)."""
    parts = [f"rl step {record.get('step')}/{total} v{record.get('weights_version')}"]
    for key, label in (("reward/mean", "reward"), ("seq_len/mean", "len"), ("eval/pass@1", "pass@1"),
                       ("eval/reward_mean", "held-out reward")):
        if isinstance(record.get(key), int | float):
            parts.append(f"{label} {record[key]:.3f}")
    return " | ".join(parts)


def _worker_entry(config: dict[str, Any]) -> None:
    from nanochat.rl.loop import rl_loop_per_worker

    rl_loop_per_worker(config)


def _last_record(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    for line in reversed(path.read_text().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return {}

