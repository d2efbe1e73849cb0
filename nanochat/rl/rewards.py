"""Rewards: a pluggable ``reward(conversation, completion) -> float`` and the tasks RL trains on.

Any callable with that signature is a reward; :class:`TaskReward` turns a task's ``evaluate``
(verifiable answer checking) into 1.0 / 0.0, as nanochat does for GSM8K. :func:`rl_tasks` maps the
preset's ``rl.task`` to (train task, held-out task, reward):

- ``gsm8k`` (GPU presets' default): final ``#### N`` answer, commas removed, string equality; the
  rollout engine runs the python calculator on ``<|python_start|>…<|python_end|>`` as nanochat does.
- ``arithmetic`` (the CPU ``tiny`` preset): ``What is 3 + 5?`` -> ``#### 8``, the same ``####`` rule;
  a 5M-parameter model improves on it within minutes (:mod:`nanochat.tasks.arithmetic`).
- ``spelling_bee``: letter counting with the python tool, ``#### N`` answers.
"""

from __future__ import annotations

from os import PathLike
from typing import Any, Protocol

from nanochat.common import NanochatError
from nanochat.tasks.base import ConversationDict, Task

TASKS = ("gsm8k", "arithmetic", "spelling_bee")


class RewardFn(Protocol):
    def __call__(self, conversation: ConversationDict, completion: str) -> float: ...


class TaskReward:
    """1.0 when ``task.evaluate(conversation, completion)`` holds, else 0.0 (a failing check scores 0)."""

    def __init__(self, task: Task):
        self.task = task

    def __call__(self, conversation: ConversationDict, completion: str) -> float:
        try:
            return 1.0 if self.task.evaluate(conversation, completion) else 0.0
        except Exception:  # noqa: BLE001 - a malformed completion is a wrong answer, not a crash
            return 0.0


def rl_tasks(name: str, source: str = "builtin", base: str | PathLike | None = None) -> tuple[Task, Task, RewardFn]:
    """``(train task, held-out task, reward)`` for ``rl.task = name``.

    Raises:
        NanochatError: unknown task name (the message lists :data:`TASKS`).
    """
    train: Any
    if name == "gsm8k":
        from nanochat.tasks.gsm8k import GSM8K

        train, test = GSM8K("train", source, base=base), GSM8K("test", source, base=base)
    elif name == "arithmetic":
        from nanochat.tasks.arithmetic import Arithmetic

        train, test = Arithmetic(100_000, "train"), Arithmetic(1_000, "test")
    elif name == "spelling_bee":
        from nanochat.tasks.spelling import SpellingBee

        train, test = SpellingBee(100_000, "train"), SpellingBee(1_000, "test")
    else:
        raise NanochatError(f"unknown rl.task {name!r}: choose one of {', '.join(TASKS)}")
    return train, test, TaskReward(train)
