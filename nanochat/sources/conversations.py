"""The JSONL conversation format: read, validate and write chat data.

One conversation per line, either an object ``{"messages": [...], ...}`` (extra keys kept) or a
bare JSON array of messages (the identity-conversations format). Conversations follow the chat
rules of :class:`nanochat.conversation.Conversation` with whitespace-only content refused (training
data); this module adds the file and line number to every error. It knows nothing about tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write_text
from nanochat.conversation import Conversation, ConversationError


class ConversationFormatError(ConversationError):
    """A conversation file or object breaks the format; the message names the line and the rule."""


def check_conversation(conversation: Any) -> dict[str, Any]:
    """Validate one conversation (object or bare message list) and return it as ``{"messages": ...}``.

    An object is returned as is (the same dict). Raises ConversationFormatError with the
    message/part index and the rule that failed.
    """
    try:
        Conversation.parse(conversation, allow_blank=False)
    except ConversationError as err:
        raise ConversationFormatError(str(err)) from None
    return {"messages": conversation} if isinstance(conversation, list) else conversation


def parse_line(line: str, lineno: int, source: str = "<input>") -> dict[str, Any]:
    """Parse and validate one JSONL line; errors read ``source:lineno: what is wrong``."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConversationFormatError(f"{source}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    try:
        return check_conversation(obj)
    except ConversationFormatError as err:
        raise ConversationFormatError(f"{source}:{lineno}: {err}") from None


def iter_conversations(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield validated conversations from a JSONL file, skipping blank lines."""
    path = Path(path)
    if not path.exists():
        raise ConversationFormatError(f"{path}: no such conversation file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield parse_line(line, lineno, str(path))


def read_conversations(path: str | Path) -> list[dict[str, Any]]:
    """All conversations of a JSONL file (validated; the first bad line raises)."""
    return list(iter_conversations(path))


def write_conversations(path: str | Path, conversations: Iterable[Any]) -> int:
    """Validate and write conversations as JSONL (atomically); returns the count."""
    lines = []
    for i, conv in enumerate(conversations):
        try:
            lines.append(json.dumps(check_conversation(conv), ensure_ascii=False))
        except ConversationFormatError as err:
            raise ConversationFormatError(f"conversation {i}: {err}") from None
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
