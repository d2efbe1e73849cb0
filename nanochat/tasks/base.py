"""Task: an indexable collection of conversations, with views and deterministic mixtures.

A task maps an index to a conversation dict ``{"messages": [...], <task fields>}``. ``start``,
``stop`` and ``step`` give a view onto the underlying rows (like a slice), so a train/eval split
or a cap is a view, not a copy. ``TaskMixture`` interleaves tasks in a seeded random order (a
task listed twice is seen twice: two epochs); ``TaskSequence`` concatenates them in order.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any, Literal

from nanochat.common import NanochatError

ConversationDict = dict[str, Any]  # {"messages": [...], <task fields>}: the chat rules of nanochat.conversation
EvalType = Literal["categorical", "generative"]

GSM_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


class Task:
    """Base class: subclasses implement ``num_examples`` and ``get_example`` over their own rows."""

    eval_type: EvalType = "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise NanochatError(f"{type(self).__name__}: invalid view start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self) -> str:
        return type(self).__name__

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> ConversationDict:
        raise NotImplementedError

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        span = stop - self.start
        return max(0, -(-span // self.step))

    def __getitem__(self, index: int) -> ConversationDict:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} examples")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def evaluate(self, conversation: ConversationDict, completion: str) -> bool:
        """Whether ``completion`` answers the conversation's last user turn correctly."""
        raise NotImplementedError(f"{self.name} has no evaluation")


class TaskMixture(Task):
    """All (task, index) pairs of the given tasks, shuffled once with ``random.Random(seed)``."""

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **view: int | None):
        super().__init__(**view)
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> ConversationDict:
        t, i = self.index[index]
        return self.tasks[t][i]

    def source_of(self, index: int) -> str:
        """Name of the task that row ``index`` of this view comes from."""
        return self.tasks[self.index[self.start + index * self.step][0]].name


class TaskSequence(Task):
    """The given tasks one after another, in order (for eval sets and curricula)."""

    def __init__(self, tasks: Sequence[Task], **view: int | None):
        super().__init__(**view)
        self.tasks = list(tasks)
        self.offsets = []
        total = 0
        for task in self.tasks:
            self.offsets.append(total)
            total += len(task)
        self.total = total

    def num_examples(self) -> int:
        return self.total

    def get_example(self, index: int) -> ConversationDict:
        for task, offset in zip(reversed(self.tasks), reversed(self.offsets)):
            if index >= offset:
                return task[index - offset]
        raise IndexError(index)


class ListTask(Task):
    """A task over an in-memory list of conversations (or rows turned into them by ``to_conversation``)."""

    def __init__(self, rows: Sequence[Any], name: str = "ListTask", **view: int | None):
        super().__init__(**view)
        self.rows = rows
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> ConversationDict:
        return self.to_conversation(self.rows[index])

    def to_conversation(self, row: Any) -> ConversationDict:
        return row


def extract_hash_answer(text: str) -> str | None:
    """The number after ``####`` with commas removed (GSM8K/SpellingBee answer rule), or None."""
    match = GSM_ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def last_text(conversation: ConversationDict) -> str:
    """Text of the final assistant message (concatenated text parts for a parts list)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")
