"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn chat, downloaded from the hub.

Rows hold ``messages`` (``{"role", "content"}``, an optional leading system message). Rows that
break the chat rules are skipped at load time (and counted in ``self.skipped``).
"""

from __future__ import annotations

from os import PathLike

from nanochat.sources import hub
from nanochat.sources.conversations import ConversationFormatError, check_conversation
from nanochat.tasks.base import ConversationDict, ListTask


class SmolTalk(ListTask):
    eval_type = "generative"

    def __init__(self, split: str = "train", *, base: str | PathLike | None = None, **view: int | None):
        """``base``: the artifacts root holding the hub cache (default ``$NANOCHAT_BASE_DIR``)."""
        rows: list[ConversationDict] = []
        self.skipped = 0
        for row in hub.read_parquet_split(*hub.SMOLTALK, split, base):
            messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            try:
                rows.append(check_conversation({"messages": messages}))
            except ConversationFormatError:
                self.skipped += 1
        super().__init__(rows, f"SmolTalk:{split}", **view)
        self.split = split
