"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn chat, downloaded from the hub.

Rows hold ``messages`` (``{"role", "content"}``, an optional leading system message). Rows that
break the chat rules are skipped at load time (and counted in ``self.skipped``).
"""

from __future__ import annotations

from nanochat.data.conversations import ConversationFormatError, check_conversation
from nanochat.tasks import hub
from nanochat.tasks.base import Conversation, Task


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split: str = "train", **view: int | None):
        super().__init__(**view)
        self.split = split
        self.rows: list[Conversation] = []
        self.skipped = 0
        for row in hub.read_parquet_split(*hub.SMOLTALK, split):
            messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            try:
                self.rows.append(check_conversation({"messages": messages}))
            except ConversationFormatError:
                self.skipped += 1

    @property
    def name(self) -> str:
        return f"SmolTalk:{self.split}"

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        return self.rows[index]
