"""Short arithmetic (no download): ``What is 3 + 5?`` -> ``#### 8``.

A verifiable task small enough for the CPU ``tiny`` preset's RL stage: a few-million-parameter
model learns the answer format in a few dozen SFT steps and then has a measurable, improvable
accuracy. Answers use GSM8K's ``#### N`` rule (:func:`~nanochat.tasks.base.extract_hash_answer`),
so the same reward function scores both. Operands are ``0..max_operand``; examples come from
``random.Random`` seeded by (split, index), so any index is cheap, fixed, and the splits differ.
"""

from __future__ import annotations

import random
from typing import Literal

from nanochat.common import NanochatError
from nanochat.tasks.base import ConversationDict, Task, extract_hash_answer, last_text

SPLIT_SEED = {"train": 7, "test": (1 << 30) + 7}
OPS = ("+", "-")


class Arithmetic(Task):
    """``size`` questions ``a <op> b`` with ``0 <= a, b <= max_operand`` (``-`` keeps ``a >= b``)."""

    eval_type = "generative"

    def __init__(self, size: int = 10_000, split: Literal["train", "test"] = "train", max_operand: int = 9,
                 **view: int | None):
        super().__init__(**view)
        if split not in SPLIT_SEED:
            raise NanochatError(f"Arithmetic split must be train or test, got {split!r}")
        self.size, self.split, self.max_operand = size, split, max_operand

    @property
    def name(self) -> str:
        return f"Arithmetic:{self.split}"

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> ConversationDict:
        rng = random.Random(SPLIT_SEED[self.split] * 1_000_003 + index)
        a, b, op = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand), rng.choice(OPS)
        if op == "-" and b > a:
            a, b = b, a
        result = a + b if op == "+" else a - b
        return {
            "messages": [
                {"role": "user", "content": f"What is {a} {op} {b}?"},
                {"role": "assistant", "content": f"#### {result}"},
            ]
        }

    def evaluate(self, conversation: ConversationDict, completion: str) -> bool:
        reference = extract_hash_answer(last_text(conversation))
        return reference is not None and extract_hash_answer(completion) == reference
