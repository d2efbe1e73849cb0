"""The ``rl`` stage: a learner actor and N rollout actors on Ray, driven step by step from here.

Per step: the driver hands each rollout actor a share of the step's ``questions_per_step`` train
questions with the weights version it must sample with; the actors sample ``num_samples``
completions each through their :class:`~nanochat.engine.Engine` and score them; the driver checks
that ``learner version - rollout version <= rl.max_staleness`` (default 0: on-policy) and sends
the groups to the learner, which takes one optimizer step (version + 1) and puts its weights in the
object store once; every rollout actor loads them from there. With ``max_staleness >= 1`` the next
step's rollouts are sampled while the learner trains (version v rollouts trained at v + 1).

Every ``rl.eval_every`` steps (and at the start and the end): pass@1..k and mean reward on
``rl.eval_questions`` held-out questions. Metrics go to ``checkpoints/rl/<tag>/metrics.jsonl``
(one JSON record per step), the end summary to ``summary.json``; checkpoints and resume are the
learner's (:mod:`nanochat.rl.learner`): a rerun continues at the saved step and weights version.

Why one learner actor and not Ray Train + DeepSpeed: the RL step alternates with rollouts and a
weights broadcast every step, which a Ray Train worker loop would have to drive from inside; the
policy of nanochat's RL stage (≤ d32) fits one accelerator, so the learner reuses the shared
optimizer groups (:func:`nanochat.train.optim.build_optimizer`) and the checkpoint format without
the data-parallel machinery. See docs/rl.md.
"""

from __future__ import annotations

import json
import random
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
    list_checkpoints,
    prune_checkpoints,
    read_meta,
    resolve_checkpoint,
    step_of,
)
from nanochat.common import NanochatError, atomic_write_text, base_dir, get_logger
from nanochat.config import Preset
from nanochat.rl.rewards import rl_tasks
from nanochat.rl.rollout import Group

log = get_logger("nanochat.rl")


class StalenessError(NanochatError):
    """A rollout would be trained on with weights older than ``rl.max_staleness`` allows."""


@dataclass
class RLResult:
    checkpoint: str
    num_iterations: int
    wall_seconds: float
    metrics: dict[str, Any]
    summary_path: str


def group_stats(groups: list[Group]) -> dict[str, float]:
    """Mean reward, mean completion length, fraction of all-correct / all-wrong (zero-advantage) groups."""
    rewards = [r for g in groups for r in g.rewards]
    lengths = [s.completion_tokens for g in groups for s in g.samples]
    same = [g for g in groups if len(set(g.rewards)) == 1]
    return {
        "reward/mean": sum(rewards) / max(len(rewards), 1),
        "seq_len/mean": sum(lengths) / max(len(lengths), 1),
        "groups/all_correct": sum(1 for g in same if g.rewards[0] > 0) / max(len(groups), 1),
        "groups/all_wrong": sum(1 for g in same if g.rewards[0] <= 0) / max(len(groups), 1),
        "groups/zero_advantage": len(same) / max(len(groups), 1),
    }


def pass_at_k(groups: list[Group], k: int) -> dict[str, float]:
    """``pass@j`` for j = 1..k: fraction of questions with a positive reward among their first j samples."""
    out = {}
    for j in range(1, k + 1):
        out[f"eval/pass@{j}"] = sum(any(r > 0 for r in g.rewards[:j]) for g in groups) / max(len(groups), 1)
    out["eval/reward_mean"] = sum(r for g in groups for r in g.rewards) / max(sum(len(g.rewards) for g in groups), 1)
    return out


def question_order(num_train: int, seed: int) -> list[int]:
    """The fixed order train questions are visited in (a resumed run continues it)."""
    order = list(range(num_train))
    random.Random(seed).shuffle(order)
    return order


def _split(items: list[int], parts: int) -> list[list[int]]:
    return [items[i::parts] for i in range(parts)]


class _Driver:
    def __init__(self, preset: Preset, learner, actors: list, sampling: dict[str, Any]):
        self.preset, self.rl, self.learner, self.actors, self.sampling = preset, preset.rl, learner, actors, sampling
        self.version = 0

    def launch(self, questions: list[int], version: int, params: dict[str, Any], split: str = "train") -> list:
        shares = _split(questions, len(self.actors))
        return [a.rollout.remote(q, version, params, split) for a, q in zip(self.actors, shares) if q]

    def collect(self, futures: list) -> tuple[list[Group], float, int]:
        import ray

        results = ray.get(futures)
        groups = [g for gs, _ in results for g in gs]
        return groups, max((st.seconds for _, st in results), default=0.0), sum(st.tokens for _, st in results)

    def broadcast(self) -> None:
        import ray

        ref = ray.get(self.learner.publish.remote())
        ray.get([a.load_weights.remote(ref, self.version) for a in self.actors])

    def evaluate(self, num_test: int) -> dict[str, float]:
        n = min(self.rl.eval_questions, num_test)
        params = {**self.sampling, "n": self.rl.pass_k}
        groups, seconds, tokens = self.collect(self.launch(list(range(n)), self.version, params, "test"))
        return {**pass_at_k(groups, self.rl.pass_k), "eval/seconds": seconds, "eval/questions": float(n)}


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


def _resume_point(tag_dir: Path, tag: str, base: Path, restart: bool) -> tuple[Path | None, dict[str, Any]]:
    if restart or not tag_dir.is_dir():
        return None, {}
    found = list_checkpoints("rl", tag, base)
    if not found:
        return None, {}
    latest = max(found, key=step_of)
    return latest, (read_meta(latest).get("extra") or {}).get("rl", {})


def train_rl(preset: Preset, from_checkpoint: str | None = None, tag: str | None = None, restart: bool = False,
             stop_at_step: int | None = None, num_rollout_actors: int | None = None,
             base: str | PathLike | None = None) -> RLResult:
    """Run (or resume) the RL stage; returns where its last checkpoint is and its final metrics.

    Raises:
        CheckpointError: no SFT checkpoint to start from (run ``nanochat train sft``).
        StalenessError: a rollout older than ``rl.max_staleness`` reached the learner (a bug, not a setting).
    """
    import ray

    from nanochat.ray_utils import cluster_has_gpus, init_ray
    from nanochat.rl.learner import Learner, optimizer_path
    from nanochat.rl.rollout import RolloutWorker

    base = base_dir(base)
    rl = preset.rl
    t_start = time.time()
    resume_from, state, source = None, {}, None
    if tag:
        resume_from, state = _resume_point(checkpoints_root("rl", base) / tag, tag, base, restart)
    if resume_from is None:
        source = resolve_source_checkpoint(from_checkpoint, tag, base)  # raises, naming the fix
        tag = tag or checkpoint_tag(source)
        resume_from, state = _resume_point(checkpoints_root("rl", base) / tag, tag, base, restart)
    tag_dir = checkpoints_root("rl", base) / tag
    if restart and tag_dir.is_dir():  # start over: the old run's checkpoints would otherwise be resumed later
        shutil.rmtree(tag_dir)
    start_ckpt = resume_from or source
    train_task, test_task, _ = rl_tasks(rl.task, preset.mixture.source, base)
    num_iterations = rl.num_iterations if rl.num_iterations > 0 else len(train_task) // rl.questions_per_step
    init_ray(num_cpus=preset.ray.num_cpus, base=base)
    gpu = bool(preset.ray.use_gpu if preset.ray.use_gpu is not None else cluster_has_gpus())
    n_actors = num_rollout_actors or rl.num_rollout_actors
    learner = ray.remote(Learner).options(num_cpus=1, num_gpus=1 if gpu else 0).remote(
        str(start_ckpt), rl, preset.sft, None if gpu else 1)
    actors = [ray.remote(RolloutWorker).options(num_cpus=rl.rollout_cpus, num_gpus=1 if gpu else 0).remote(
        str(start_ckpt), rl.task, preset.mixture.source, str(base), rl.rollout_batch_size,
        None if gpu else max(1, int(rl.rollout_cpus))) for _ in range(n_actors)]
    try:
        step = int(state.get("step", 0))
        driver = _Driver(preset, learner, actors, {"max_tokens": rl.max_new_tokens, "temperature": rl.temperature,
                                                    "top_k": rl.top_k})
        driver.version = int(state.get("weights_version", 0))
        if resume_from is not None:
            ray.get(learner.restore.remote(str(optimizer_path(tag_dir, step)), step, driver.version,
                                           int(state.get("questions_seen", 0))))
            log.info("resuming rl/%s at step %d (weights v%d)", tag, step, driver.version)
        driver.broadcast()  # the starting (or resumed) weights, with their version
        tag_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = tag_dir / "metrics.jsonl"
        _truncate_metrics(metrics_path, step)  # a crashed run's records past its checkpoint are replayed
        order = question_order(len(train_task), rl.seed)
        params = {**driver.sampling, "n": rl.num_samples}

        def questions(s: int) -> list[int]:
            return [order[(s * rl.questions_per_step + i) % len(order)] for i in range(rl.questions_per_step)]

        def write(record: dict[str, Any]) -> None:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

        end = num_iterations if stop_at_step is None else min(num_iterations, stop_at_step)
        last: dict[str, Any] = {}
        if step == 0:
            last = {"step": 0, "weights_version": driver.version, **driver.evaluate(len(test_task))}
            write(last)
        pending = driver.launch(questions(step), driver.version, params) if step < end else None
        pending_version = driver.version
        ckpt_path = str(resume_from) if resume_from else None
        while step < end:
            t0 = time.perf_counter()
            groups, rollout_s, tokens = driver.collect(pending)
            wait_s = time.perf_counter() - t0
            for g in groups:
                if driver.version - g.version > rl.max_staleness:
                    raise StalenessError(f"rollout from weights v{g.version} reached the learner at v{driver.version} "
                                         f"(rl.max_staleness={rl.max_staleness})")
            staleness = driver.version - pending_version
            pending = None
            if rl.max_staleness >= 1 and step + 1 < end:  # sample the next step with the current weights meanwhile
                pending, pending_version = driver.launch(questions(step + 1), driver.version, params), driver.version
            out = ray.get(learner.train_step.remote(groups, num_iterations))
            driver.version = int(out["weights_version"])
            driver.broadcast()
            step += 1
            if pending is None and step < end:
                pending, pending_version = driver.launch(questions(step), driver.version, params), driver.version
            learn_s = out["learner_s"]
            record = {"step": step, "weights_version": driver.version, "staleness": staleness, **group_stats(groups),
                      "loss": out["loss"], "lr_mult": out["lr_mult"], "time/rollout_s": rollout_s,
                      "time/learner_s": learn_s, "learner_idle_frac": wait_s / max(wait_s + learn_s, 1e-9),
                      "rollout_tokens_per_s": tokens / max(rollout_s, 1e-9), "rollout_tokens": tokens}
            final = step == num_iterations
            if (rl.eval_every > 0 and step % rl.eval_every == 0) or final:
                record.update(driver.evaluate(len(test_task)))
            if step % rl.report_every == 0 or final or step == end:
                write(record)
                log.info("rl step %d/%d v%d reward %.3f len %.1f%s", step, num_iterations, driver.version,
                         record["reward/mean"], record["seq_len/mean"],
                         f" pass@1 {record['eval/pass@1']:.3f}" if "eval/pass@1" in record else "")
            last = record
            if (rl.save_every > 0 and step % rl.save_every == 0) or step == end:
                ckpt_path = ray.get(learner.save.remote(str(tag_dir), tag, _jsonable(record)))
                _prune(tag_dir, rl.keep_checkpoints)
        if pending:
            ray.get(pending)
    finally:  # free the CPUs/GPUs they hold even when a step failed
        for handle in [learner, *actors]:
            ray.kill(handle)
    wall = time.time() - t_start
    summary = {"stage": "rl", "tag": tag, "num_iterations": num_iterations, "step": step, "wall_seconds": wall,
               "checkpoint": ckpt_path, "source_checkpoint": str(source) if source else None, "final": _jsonable(last)}
    summary_path = tag_dir / "summary.json"
    if step == num_iterations:
        atomic_write_text(summary_path, json.dumps(summary, indent=2))
    return RLResult(ckpt_path or "", num_iterations, wall, last, str(summary_path))


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps ``<= step`` (all of them gone for a fresh run)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line of a killed run
    atomic_write_text(path, "".join(line + "\n" for line in kept) if step > 0 else "")


def _prune(tag_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and the optimizer states that belong to them."""
    prune_checkpoints(tag_dir, keep)
    for optim in (tag_dir / "optim").glob("step_*.pt"):
        if not (tag_dir / optim.stem).is_dir():
            optim.unlink(missing_ok=True)


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool)) or v is None}
