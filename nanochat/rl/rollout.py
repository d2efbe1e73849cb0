"""Rollouts: ``num_samples`` completions per question from the :class:`~nanochat.engine.Engine`, scored.

:func:`sample_groups` is the pure part (an engine in, scored groups out): all questions of a call
go into the engine together (continuous batching; the python calculator runs as in chat), and the
tokens of each sample are kept with a mask: 1 for the tokens the policy sampled (including the
end-of-turn token, so the model learns when to stop), 0 for the prompt and for the tool's forced
``<|output_start|>…<|output_end|>`` tokens. :class:`RolloutWorker` is the Ray actor around it: it
holds one engine and the weights of one version (:meth:`RolloutWorker.load_weights`), and refuses
to sample for a version it does not hold, so the driver always knows which weights made a rollout.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch

from nanochat.engine import Engine, SamplingParams
from nanochat.rl.rewards import RewardFn, rl_tasks
from nanochat.tasks.base import ConversationDict


@dataclass
class Sample:
    """One completion: ``tokens`` = prompt + completion ids, ``mask[t]`` = 1 when ``tokens[t]`` was sampled."""

    tokens: list[int]
    mask: list[int]
    reward: float
    completion_tokens: int


@dataclass
class Group:
    """The ``num_samples`` samples of one question (index into the task) and the weights version that made them."""

    question: int
    samples: list[Sample]
    version: int = 0

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]


@dataclass
class RolloutStats:
    seconds: float = 0.0
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class StaleWeightsError(RuntimeError):
    """A rollout was asked for a weights version the actor does not hold (the driver's bookkeeping is off)."""


def sample_groups(engine: Engine, tokenizer, conversations: list[ConversationDict], questions: list[int],
                  params: SamplingParams, reward: RewardFn) -> list[Group]:
    """``params.n`` scored samples of each conversation's last user turn, all through ``engine`` at once."""
    by_id: dict[int, tuple[int, ConversationDict, list[int]]] = {}
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for q, conv in zip(questions, conversations, strict=True):
        prompt = tokenizer.render_for_completion(conv)
        seq_id = engine.add(prompt, params)
        by_id[seq_id] = (q, conv, prompt)
        for i in range(params.n):
            rows[(seq_id, i)] = {"tokens": [], "mask": [], "text": [], "done": False}
    pending = len(rows)
    while pending:
        for ev in engine.step():
            row = rows.get((ev.seq_id, ev.index))
            if row is None or row["done"]:
                continue
            if ev.token_id >= 0:
                row["tokens"].append(ev.token_id)
                row["mask"].append(0 if ev.forced else 1)
                row["text"].append(ev.text)
            if ev.finished:
                row["done"] = True
                row["error"] = ev.finish_reason == "error"
                pending -= 1
    groups = []
    for seq_id, (q, conv, prompt) in by_id.items():
        samples = []
        for i in range(params.n):
            row = rows[(seq_id, i)]
            text = "".join(row["text"])
            score = 0.0 if row.get("error") else float(reward(conv, text))
            samples.append(Sample(prompt + row["tokens"], [0] * len(prompt) + row["mask"], score, len(row["tokens"])))
        groups.append(Group(q, samples))
    return groups


class RolloutWorker:
    """A rollout actor: one engine over a copy of the policy at one weights version (wrap with ``ray.remote``)."""

    def __init__(self, checkpoint: str | PathLike, task: str, source: str = "builtin",
                 base: str | PathLike | None = None, max_batch_size: int = 32, threads: int | None = None):
        from nanochat.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ckpt = load_checkpoint(checkpoint, device=device)
        self.model, self.tokenizer = ckpt.model, ckpt.tokenizer
        self.train_task, self.test_task, self.reward = rl_tasks(task, source, base)
        self.engine = Engine(self.model, self.tokenizer, max_batch_size=max_batch_size, prefix_cache=False)
        self.version = 0
        self.pid = os.getpid()

    def load_weights(self, state: list[Any], version: int) -> int:
        """Load ``state[0]`` (a state dict, or its object ref, passed in a list so Ray does not copy it
        per call) as weights ``version``; returns the version now held."""
        import ray

        weights = state[0]
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)
        with torch.no_grad():
            self.model.load_state_dict({k: v.to(self.model.lm_head.weight.device) for k, v in weights.items()})
        self.version = version
        return self.version

    def rollout(self, questions: list[int], version: int, params: dict[str, Any], split: str = "train"
                ) -> tuple[list[Group], RolloutStats]:
        """Sample groups for task rows ``questions`` with weights ``version`` (must be the one held).

        Raises:
            StaleWeightsError: the actor holds another version.
        """
        if version != self.version:
            raise StaleWeightsError(f"rollout for weights v{version} but this actor holds v{self.version}")
        task = self.train_task if split == "train" else self.test_task
        t0 = time.perf_counter()
        with torch.inference_mode():
            groups = sample_groups(self.engine, self.tokenizer, [task[q] for q in questions], questions,
                                   SamplingParams(**params), self.reward)
        for g in groups:
            g.version = self.version
        tokens = sum(s.completion_tokens for g in groups for s in g.samples)
        return groups, RolloutStats(time.perf_counter() - t0, tokens, {"pid": self.pid})
