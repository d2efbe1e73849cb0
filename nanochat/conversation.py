"""The chat format as one pydantic model: what a conversation may hold, checked in one place.

Rules (nanochat's): an object ``{"messages": [...], <extra keys kept>}`` or a bare list of
messages; an optional leading ``system`` message, which must be followed by a user one; then
strict user/assistant alternation starting with user. System and user content is a string;
assistant content is a string or a list of parts ``{"type": "text"|"python"|"python_output",
"text": str}``. Contents must not be empty unless ``allow_empty`` (a chat request may send an
empty turn, training data must not); ``allow_blank=False`` also refuses whitespace-only content
(files of training conversations). A system message's content is never empty or blank.

Every failure raises :class:`ConversationError` naming the message (and part) index and the
rule, e.g. ``message 1, part 0: unknown part type 'image' (allowed: text, python, python_output)``.
The tokenizer renders :meth:`Conversation.turns`; :mod:`nanochat.sources.conversations` reads
and writes JSONL files of conversations with these rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from nanochat.common import NanochatError

ASSISTANT_PART_TYPES = ("text", "python", "python_output")
ROLES = ("system", "user", "assistant")


class ConversationError(NanochatError, ValueError):
    """A conversation breaks the chat rules; the message names the message index and the rule."""


class Part(BaseModel):
    """One part of an assistant turn: text, a python tool call, or the tool's output."""

    type: Literal["text", "python", "python_output"]
    text: StrictStr


def _content_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    return "parts" if isinstance(value, list) else None


AssistantContent = Annotated[
    Annotated[StrictStr, Tag("text")] | Annotated[list[Part], Tag("parts")],
    Discriminator(_content_kind, custom_error_type="assistant_content",
                  custom_error_message="assistant content must be a non-empty string or list of parts"),
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # extra keys (e.g. a dataset's "name") are ignored


class SystemMessage(_Message):
    role: Literal["system"]
    content: StrictStr


class UserMessage(_Message):
    role: Literal["user"]
    content: StrictStr


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: AssistantContent


def _role(value: Any) -> str | None:
    role = value.get("role") if isinstance(value, dict) else None
    return role if isinstance(role, str) and "content" in value else None


Message = Annotated[
    Annotated[SystemMessage, Tag("system")] | Annotated[UserMessage, Tag("user")]
    | Annotated[AssistantMessage, Tag("assistant")],
    Discriminator(_role),
]


class Conversation(BaseModel):
    """A validated conversation. Build it with :meth:`parse` (errors name the message and the rule)."""

    model_config = ConfigDict(extra="allow")

    messages: Annotated[list[Message], Field(min_length=1)]

    @classmethod
    def parse(cls, conversation: Any, *, allow_empty: bool = False, allow_blank: bool = True) -> Conversation:
        """Validate a dict ``{"messages": [...]}`` or a bare message list; raises ConversationError."""
        if isinstance(conversation, list):
            conversation = {"messages": conversation}
        try:
            return cls.model_validate(conversation, context={"allow_empty": allow_empty, "allow_blank": allow_blank})
        except ValidationError as err:
            raise ConversationError(_explain(err.errors()[0])) from None

    @model_validator(mode="after")
    def _check_turns(self, info: ValidationInfo) -> Conversation:
        context = info.context or {}
        allow_empty, allow_blank = context.get("allow_empty", False), context.get("allow_blank", True)
        start = 0
        if self.messages[0].role == "system":
            if not self.messages[0].content.strip():
                raise ValueError("message 0: system content must be a non-empty string")
            if len(self.messages) < 2 or self.messages[1].role != "user":
                raise ValueError("message 0: a system message must be followed by a user message")
            start = 1
        for index in range(start, len(self.messages)):
            message, expected = self.messages[index], ("user", "assistant")[(index - start) % 2]
            if message.role != expected:
                raise ValueError(
                    f"message {index}: expected role {expected!r}, got {message.role!r} "
                    "(roles must alternate user, assistant, … starting with user; system only first)"
                )
            _check_content(message.content, index, allow_empty, allow_blank)
        return self

    def turns(self) -> list[dict[str, Any]]:
        """The user/assistant turns as plain dicts, a system message merged into the first user turn
        (joined by a blank line); assistant parts become ``{"type", "text"}`` dicts."""
        out: list[dict[str, Any]] = []
        system = ""
        for message in self.messages:
            content = message.content
            if message.role == "system":
                system = content + "\n\n"
                continue
            if isinstance(content, list):
                content = [{"type": p.type, "text": p.text} for p in content]
            elif message.role == "user" and system:
                content, system = system + content, ""
            out.append({"role": message.role, "content": content})
        return out


def _check_content(content: str | list[Part], index: int, allow_empty: bool, allow_blank: bool) -> None:
    if not content and not allow_empty:
        if isinstance(content, list):
            raise ValueError(f"message {index}: assistant content must be a non-empty string or list of parts")
        raise ValueError(f"message {index}: content must not be empty")
    if allow_blank or not content:
        return
    if isinstance(content, str) and not content.strip():
        raise ValueError(f"message {index}: content must not be empty or whitespace only")
    if isinstance(content, list) and all(not part.text.strip() for part in content):
        raise ValueError(f"message {index}: every part of the assistant content is empty")


def _explain(error: Any) -> str:
    """The first pydantic error as ``message I[, part K]: rule`` (our own validators' text as is)."""
    loc, kind = error["loc"], error["type"]
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if not loc or (loc == ("messages",) and kind in ("missing", "model_type", "model_attributes_type")):
        return "conversation: expected an object with 'messages' or a JSON array of messages"
    if len(loc) == 1:
        return "conversation: expected {'messages': [...]} with at least one message"
    index = loc[1]
    if len(loc) == 2:
        if kind == "union_tag_invalid":
            return f"message {index}: unknown role {error['ctx']['tag']!r} (allowed: {', '.join(ROLES)})"
        return f"message {index}: expected an object with 'role' and 'content'"
    role, given = loc[2], error.get("input")
    if role == "system":
        return f"message {index}: system content must be a non-empty string"
    if role == "user":
        return f"message {index}: user content must be a string, got {type(given).__name__}"
    if len(loc) <= 4:
        return f"message {index}: {error['msg']}"
    part = loc[5] if len(loc) > 5 else 0
    if len(loc) > 6 and loc[6] == "text":
        return f"message {index}, part {part}: 'text' must be a string"
    if len(loc) == 6:  # the part is not an object
        given = type(given).__name__
    elif kind == "missing":
        given = None
    return f"message {index}, part {part}: unknown part type {given!r} (allowed: {', '.join(ASSISTANT_PART_TYPES)})"


def validate_conversation(conversation: Any, allow_empty: bool = False) -> list[dict[str, Any]]:
    """Check the chat rules (module doc) and return the turns with any system message merged.

    Raises ConversationError (a ValueError) naming the message index and the rule.
    """
    return Conversation.parse(conversation, allow_empty=allow_empty).turns()
