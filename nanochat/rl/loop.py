"""The RL learner's per-worker function (run by Ray Train), which on rank 0 also drives the rollout actors.

Per step, rank 0 hands each rollout actor (handles passed in the config by :mod:`nanochat.rl.run`) a
share of the step's ``questions_per_step`` train questions with the weights version it must sample
with; the actors sample ``num_samples`` completions each through their
:class:`~nanochat.engine.Engine` and score them; rank 0 checks that ``learner version - rollout
version <= rl.max_staleness`` (default 0: on-policy) and sends the groups to every rank (one
``broadcast_object_list``; nothing to send with one worker); every rank takes one optimizer step
(:class:`~nanochat.rl.learner.Learner`, version + 1); rank 0 puts the new weights in the object store
once and every rollout actor loads them from there. With ``max_staleness >= 1`` the next step's
rollouts are sampled while the learner trains (version v rollouts trained at v + 1).

Every ``rl.eval_every`` steps (and at the start and the end): pass@1..k and mean reward on
``rl.eval_questions`` held-out questions. Metrics go to ``checkpoints/rl/<tag>/metrics.jsonl`` (one
JSON record per step, written by rank 0). The resume point is the latest complete checkpoint of
``checkpoints/rl/<tag>`` (:func:`resume_point`), read here rather than by the driver so that a
worker Ray Train restarts after a failure (``ray.max_failures``) resumes from it too.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from nanochat.checkpoint import list_checkpoints, prune_checkpoints, read_meta, step_of
from nanochat.common import NanochatError, atomic_write_text, get_logger
from nanochat.rl.rollout import Group

log = get_logger("nanochat.rl")


class StalenessError(NanochatError):
    """A rollout would be trained on with weights older than ``rl.max_staleness`` allows."""


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


def resume_point(tag_dir: Path, tag: str, base: Path) -> tuple[Path | None, dict[str, Any]]:
    """The latest complete RL checkpoint of ``tag`` and its ``extra.rl`` counters (``None, {}`` when none)."""
    if not tag_dir.is_dir():
        return None, {}
    found = list_checkpoints("rl", tag, base)
    if not found:
        return None, {}
    latest = max(found, key=step_of)
    return latest, (read_meta(latest).get("extra") or {}).get("rl", {})


def _split(items: list[int], parts: int) -> list[list[int]]:
    return [items[i::parts] for i in range(parts)]


class RolloutDriver:
    """Rank 0's side of the rollout actors: launch, collect, weights broadcast, held-out evaluation."""

    def __init__(self, rl, actors: list, sampling: dict[str, Any], version: int):
        self.rl, self.actors, self.sampling, self.version = rl, actors, sampling, version

    def launch(self, questions: list[int], version: int, params: dict[str, Any], split: str = "train") -> list:
        shares = _split(questions, len(self.actors))
        return [a.rollout.remote(q, version, params, split) for a, q in zip(self.actors, shares) if q]

    def collect(self, futures: list) -> tuple[list[Group], float, int]:
        import ray

        results = ray.get(futures)
        groups = [g for gs, _ in results for g in gs]
        return groups, max((st.seconds for _, st in results), default=0.0), sum(st.tokens for _, st in results)

    def broadcast(self, ref: list[Any]) -> None:
        """Every actor loads the weights behind ``ref`` (one object-store copy) as ``self.version``."""
        import ray

        ray.get([a.load_weights.remote(ref, self.version) for a in self.actors])

    def evaluate(self, num_test: int) -> dict[str, float]:
        n = min(self.rl.eval_questions, num_test)
        params = {**self.sampling, "n": self.rl.pass_k}
        groups, seconds, tokens = self.collect(self.launch(list(range(n)), self.version, params, "test"))
        return {**pass_at_k(groups, self.rl.pass_k), "eval/seconds": seconds, "eval/questions": float(n)}


def _share(obj: Any, rank: int, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (pickled over the process group; nothing to do with one worker)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rl_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is built by :func:`nanochat.rl.run.train_rl`."""
    import ray.train
    import ray.train.torch

    from nanochat.config import Preset
    from nanochat.rl.learner import Learner, optimizer_dir

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config["threads"])))
    preset = Preset.model_validate(config["preset"])
    rl, tag, base = preset.rl, config["tag"], Path(config["base"])
    tag_dir = Path(config["tag_dir"])
    num_iterations, stop_at_step = int(config["num_iterations"]), config["stop_at_step"]
    resume_from, state = resume_point(tag_dir, tag, base)
    learner = Learner(str(resume_from or config["source"]), rl, preset.sft, device, rank, world)
    step, version = int(state.get("step", 0)), int(state.get("weights_version", 0))
    if resume_from is not None:
        learner.restore(optimizer_dir(tag_dir, step), step, version, int(state.get("questions_seen", 0)),
                        state.get("learner_workers"))
        if rank == 0:
            log.info("resuming rl/%s at step %d (weights v%d)", tag, step, version)
    driver = None
    if rank == 0:
        driver = RolloutDriver(rl, list(config["actors"]), {"max_tokens": rl.max_new_tokens,
                                                            "temperature": rl.temperature, "top_k": rl.top_k}, version)
    ref = learner.publish()
    if driver is not None:
        driver.broadcast(ref)  # the starting (or resumed) weights, with their version
    end = num_iterations if stop_at_step is None else min(num_iterations, int(stop_at_step))
    if driver is not None:
        _drive(driver, learner, rl, tag, tag_dir, step, end, num_iterations, base, preset.mixture.source)
    else:
        _follow(learner, rl, tag, tag_dir, step, end, num_iterations, rank, world)


def _save_due(rl, step: int, end: int) -> bool:
    return (rl.save_every > 0 and step % rl.save_every == 0) or step == end


def _follow(learner, rl, tag: str, tag_dir: Path, step: int, end: int, num_iterations: int, rank: int,
            world: int) -> None:
    """Ranks > 0: train on the groups rank 0 shares, publish and save in step with it."""
    while step < end:
        groups = _share(None, rank, world)
        learner.train_step(groups, num_iterations)
        learner.publish()
        step += 1
        if _save_due(rl, step, end):
            learner.save(tag_dir, tag)


def _drive(driver: RolloutDriver, learner, rl, tag: str, tag_dir: Path, step: int, end: int, num_iterations: int,
           base: Path, source: str) -> None:
    """Rank 0: rollouts, staleness check, the step, weights broadcast, evaluation, metrics, checkpoints."""
    from nanochat.rl.rewards import rl_tasks

    train_task, test_task, _ = rl_tasks(rl.task, source, base)
    metrics_path = tag_dir / "metrics.jsonl"
    tag_dir.mkdir(parents=True, exist_ok=True)
    _truncate_metrics(metrics_path, step)  # a crashed run's records past its checkpoint are replayed
    order = question_order(len(train_task), rl.seed)
    params = {**driver.sampling, "n": rl.num_samples}

    def questions(s: int) -> list[int]:
        return [order[(s * rl.questions_per_step + i) % len(order)] for i in range(rl.questions_per_step)]

    def write(record: dict[str, Any]) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    if step == 0:
        write({"step": 0, "weights_version": driver.version, **driver.evaluate(len(test_task))})
    pending = driver.launch(questions(step), driver.version, params) if step < end else None
    pending_version = driver.version
    world = learner.world
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
        out = learner.train_step(_share(groups, 0, world), num_iterations)
        driver.version = int(out["weights_version"])
        t1 = time.perf_counter()
        driver.broadcast(learner.publish())
        broadcast_s = time.perf_counter() - t1
        step += 1
        if pending is None and step < end:
            pending, pending_version = driver.launch(questions(step), driver.version, params), driver.version
        learn_s = out["learner_s"]
        record = {"step": step, "weights_version": driver.version, "staleness": staleness, **group_stats(groups),
                  "loss": out["loss"], "lr_mult": out["lr_mult"], "time/rollout_s": rollout_s,
                  "time/learner_s": learn_s, "time/broadcast_s": broadcast_s,
                  "learner_idle_frac": wait_s / max(wait_s + learn_s, 1e-9),
                  "rollout_tokens_per_s": tokens / max(rollout_s, 1e-9), "rollout_tokens": tokens,
                  "learner_workers": world}
        final = step == num_iterations
        if (rl.eval_every > 0 and step % rl.eval_every == 0) or final:
            record.update(driver.evaluate(len(test_task)))
        if step % rl.report_every == 0 or final or step == end:
            write(record)
            log.info("rl step %d/%d v%d reward %.3f len %.1f%s", step, num_iterations, driver.version,
                     record["reward/mean"], record["seq_len/mean"],
                     f" pass@1 {record['eval/pass@1']:.3f}" if "eval/pass@1" in record else "")
        if _save_due(rl, step, end):
            learner.save(tag_dir, tag, _jsonable(record))
            _prune(tag_dir, rl.keep_checkpoints)
    if pending:
        import ray

        ray.get(pending)


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
    import shutil

    prune_checkpoints(tag_dir, keep)
    for optim in (tag_dir / "optim").glob("step_*"):
        if not (tag_dir / optim.name).is_dir():
            shutil.rmtree(optim, ignore_errors=True)


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool)) or v is None}
