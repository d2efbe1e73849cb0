"""Fan-out of an evaluation over Ray actors: one model replica per actor, shards of example indices.

What it is: shard the indices, keep every actor busy, stream results back with a progress bar,
retry a shard on a fresh actor when its actor dies, and return records sorted by index — so the
numbers are identical for 1 or N actors (each record depends only on its own example; batches,
where a shard function uses them, are aligned to global indices). What it is not: scoring; the
work is a shard function ``fn(model, tokenizer, payload, indices, device) -> list[record]`` named
by its import path, e.g. ``"nanochat.eval.core:evaluate_shard"``.

``num_actors=0`` runs the same shard function in-process (no Ray), which tests and tiny runs use.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanochat.common import NanochatError, autodetect_device, get_logger

log = get_logger(__name__)


class FanoutError(NanochatError):
    """A shard kept failing after its retries."""


def resolve_function(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def make_shards(indices: list[int], num_actors: int, align: int = 1, per_actor: int = 4) -> list[list[int]]:
    """Contiguous shards, ~``per_actor`` per actor (for load balance), each a multiple of ``align`` long."""
    if not indices:
        return []
    target = max(1, math.ceil(len(indices) / max(1, num_actors * per_actor)))
    size = max(align, math.ceil(target / align) * align)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def load_model(checkpoint: str | Path, device: str | None = None):
    """(model, tokenizer, device) for an actor or the in-process path."""
    from nanochat.checkpoint import load_checkpoint

    device = device or str(autodetect_device())
    ckpt = load_checkpoint(checkpoint, device=device)
    return ckpt.model, ckpt.tokenizer, device


class EvalWorker:
    """Holds one model replica; runs shard functions on it (the body of the Ray actor)."""

    def __init__(self, checkpoint: str, device: str | None = None, fail_once_path: str | None = None):
        import torch

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.model, self.tokenizer, self.device = load_model(checkpoint, device)
        # Fault injection for tests and drills: the first worker to see the marker missing creates it
        # and dies mid-shard, exactly like an OOM-killed or preempted actor would.
        self.fail_once_path = fail_once_path

    def run(self, fn_path: str, payload: Any, indices: list[int]) -> list[dict]:
        if self.fail_once_path:
            try:
                fd = os.open(self.fail_once_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.close(fd)
                os._exit(1)
            except FileExistsError:
                pass
        fn = resolve_function(fn_path)
        return fn(self.model, self.tokenizer, payload, indices, self.device)

    def ping(self) -> bool:
        return True


def _progress(total: int, desc: str):
    """A bar per task on a terminal; elsewhere a plain line at every quarter and at the end."""
    from nanochat.progress import Bar

    return Bar(total, desc, unit="ex", plain_every=max(1, -(-total // 4)))


def run_fanout(
    checkpoint: str | Path,
    fn_path: str,
    payload: Any,
    indices: list[int],
    num_actors: int = 1,
    align: int = 1,
    use_gpu: bool | None = None,
    cpus_per_actor: float = 0.5,
    max_retries: int = 2,
    desc: str = "eval",
    fail_once_path: str | None = None,
    on_records: Callable[[list[dict]], None] | None = None,
    pool: ActorPool | None = None,
) -> list[dict]:
    """Evaluate ``indices`` with ``fn_path`` on ``num_actors`` replicas; records sorted by ``index``.

    ``pool`` reuses already-started actors (several tasks, benchmarks); otherwise actors are
    started for this call and killed at its end.
    """
    if num_actors <= 0:
        model, tokenizer, device = load_model(checkpoint)
        fn = resolve_function(fn_path)
        records = []
        bar = _progress(len(indices), desc)
        for shard in make_shards(indices, 1, align):
            out = fn(model, tokenizer, payload, shard, device)
            records += out
            bar.update(len(shard))
            if on_records:
                on_records(out)
        bar.close()
        return sorted(records, key=lambda r: r["index"])
    owned = pool is None
    pool = pool or ActorPool(checkpoint, num_actors, use_gpu, cpus_per_actor, fail_once_path)
    try:
        return _run_ray(pool, fn_path, payload, indices, align, max_retries, desc, on_records)
    finally:
        if owned:
            pool.close()


class ActorPool:
    """``num_actors`` EvalWorker actors (1 GPU each on a GPU cluster, else a fraction of a CPU)."""

    def __init__(self, checkpoint: str | Path, num_actors: int, use_gpu: bool | None = None,
                 cpus_per_actor: float = 0.5, fail_once_path: str | None = None):
        import ray

        from nanochat.ray_utils import cluster_has_gpus, init_ray

        init_ray()
        gpu = cluster_has_gpus() if use_gpu is None else use_gpu
        options = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": cpus_per_actor}
        self.actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(EvalWorker).options(**options)
        self.checkpoint, self.device = str(checkpoint), ("cuda" if gpu else "cpu")
        self.actors = [self.actor_cls.remote(self.checkpoint, self.device, fail_once_path) for _ in range(num_actors)]
        ray.get([a.ping.remote() for a in self.actors])  # models loaded before any timing starts

    def replace(self, dead) -> Any:
        import ray

        ray.kill(dead, no_restart=True)
        fresh = self.actor_cls.remote(self.checkpoint, self.device, None)
        self.actors[self.actors.index(dead)] = fresh
        return fresh

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def _run_ray(pool: ActorPool, fn_path, payload, indices, align, max_retries, desc, on_records) -> list[dict]:
    import ray

    shards = make_shards(indices, len(pool.actors), align)
    payload_ref = ray.put(payload)
    actors = list(pool.actors[: len(shards)])
    pending_shards = list(range(len(shards)))
    attempts = [0] * len(shards)
    in_flight: dict[Any, tuple[int, Any]] = {}  # object ref -> (shard id, actor)
    records: list[dict] = []
    bar = _progress(len(indices), desc)

    def submit(actor) -> None:
        if pending_shards:
            sid = pending_shards.pop(0)
            in_flight[actor.run.remote(fn_path, payload_ref, shards[sid])] = (sid, actor)

    try:
        for actor in actors:
            submit(actor)
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1)
            sid, actor = in_flight.pop(done[0])
            try:
                out = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                attempts[sid] += 1
                if attempts[sid] > max_retries:
                    raise FanoutError(f"shard {sid} failed {attempts[sid]} times; last error: {err}") from None
                log.warning("eval actor died on shard %d (%s); retrying on a fresh actor", sid, type(err).__name__)
                actor = pool.replace(actor)
                pending_shards.insert(0, sid)
                submit(actor)
                continue
            records += out
            bar.update(len(shards[sid]))
            if on_records:
                on_records(out)
            submit(actor)
    finally:
        bar.close()
    return sorted(records, key=lambda r: r["index"])
