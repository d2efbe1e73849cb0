"""The JSONL conversation format: read, validate and write chat data.

One conversation per line, either an object ``{"messages": [...], ...}`` (extra keys kept) or a
bare JSON array of messages (the identity-conversations format). Messages follow the chat rules
of :func:`nanochat.tokenizer.validate_conversation`; this module adds line numbers to every error
and refuses whitespace-only content. It knows nothing about tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from nanochat.common import NanochatError, atomic_write_text
from nanochat.tokenizer import validate_conversation


class ConversationFormatError(NanochatError, ValueError):
    """A conversation file or object breaks the format; the message names the line and the rule."""


def check_conversation(conversation: Any) -> dict[str, Any]:
    """Validate one conversation (object or bare message list) and return it as ``{"messages": ...}``.

    Raises ConversationFormatError with the message/part index and the rule that failed.
    """
    if isinstance(conversation, list):
        conversation = {"messages": conversation}
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ConversationFormatError("expected an object with 'messages' or a JSON array of messages")
    try:
        validate_conversation(conversation)
    except ValueError as err:
        raise ConversationFormatError(str(err)) from None
    for i, message in enumerate(conversation["messages"]):
        content = message["content"]
        if isinstance(content, str) and not content.strip():
            raise ConversationFormatError(f"message {i}: content must not be empty or whitespace only")
        if isinstance(content, list) and all(not part["text"].strip() for part in content):
            raise ConversationFormatError(f"message {i}: every part of the assistant content is empty")
    return conversation


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
