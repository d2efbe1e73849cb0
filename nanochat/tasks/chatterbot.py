"""Short everyday conversations from the PyPI ``chatterbot-corpus`` (BSD, ~2,000 English dialogues).

Each corpus entry is a list of turns alternating user / assistant; an odd trailing user turn is
dropped. ``botprofile`` is excluded (it describes a different bot; identity comes from our own
identity task). Split: entry ``i`` (in file order) is ``test`` when ``i % 10 == 9``, else ``train``.
"""

from __future__ import annotations

from typing import Any, Literal

from nanochat.common import NanochatError
from nanochat.sources import registry
from nanochat.tasks.base import ConversationDict, ListTask

EXCLUDED = ("botprofile",)


class ChatterbotCorpus(ListTask):
    eval_type = "generative"

    def __init__(self, split: Literal["train", "test", "all"] = "train", **view: int | None):
        if split not in ("train", "test", "all"):
            raise NanochatError(f"ChatterbotCorpus split must be train, test or all, got {split!r}")
        rows = [r for r in registry.read_chatterbot(exclude=EXCLUDED) if len(r["turns"]) >= 2]
        if split != "all":
            rows = [r for i, r in enumerate(rows) if (i % 10 == 9) == (split == "test")]
        super().__init__(rows, f"Chatterbot:{split}", **view)
        self.split = split

    def to_conversation(self, row: dict[str, Any]) -> ConversationDict:
        turns = row["turns"][: len(row["turns"]) // 2 * 2]
        roles = ("user", "assistant")
        return {
            "messages": [{"role": roles[i % 2], "content": t.strip() or "..."} for i, t in enumerate(turns)],
            "category": row["category"],
        }
