"""OpenAI chat ``messages``: their pydantic models and how they become a nanochat prompt.

The OpenAI API accepts more than nanochat's chat format (bos, then alternating user and
assistant turns, a system message merged into the first user turn, tool calls and results
inside the assistant turn). :func:`to_conversation` maps every shape OpenAI accepts onto that
format; the table in docs/api.md lists the rules:

- ``system``/``developer`` text joins the user turn it is next to; consecutive user-side
  messages merge into one turn, their non-empty texts joined by a blank line.
- Consecutive assistant-side messages (``assistant``, ``tool``, ``function``) merge into one
  assistant turn: a tool call becomes a python block (``name(arguments)``), a tool result an
  output block, a refusal plain text. nanochat's own tool markup in assistant text
  (``<|python_start|>…<|python_end|>``, ``<|output_start|>…<|output_end|>``, what the server
  streams when it runs the calculator) becomes those blocks again, so a reply sent back
  renders as the tokens the model produced.
- A conversation that starts on the assistant side gets an empty user turn before it; one that
  ends on the assistant side is continued: the reply extends that turn.

Ordering errors (a tool result without its call, a call left unanswered) raise
:class:`MessageError`, which names the field (``messages.3.tool_call_id``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

PART_SEPARATOR = "\n\n"  # between merged messages of one turn, as nanochat joins system and user
_MARKUP = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


class MessageError(ValueError):
    """A conversation OpenAI would reject too; ``param`` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class AssistantPart(_Strict):
    """``{"type": "text", "text"}`` or ``{"type": "refusal", "refusal"}`` (one model: errors name the field)."""

    type: Literal["text", "refusal"]
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _check(self) -> AssistantPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"a '{self.type}' part needs '{self.type}'")
        return self

    @property
    def value(self) -> str:
        return getattr(self, self.type)


TextParts = Annotated[list[TextPart], Field(min_length=1)]
AssistantParts = Annotated[list[AssistantPart], Field(min_length=1)]


class FunctionCall(_Strict):
    name: str
    arguments: str


class CustomCall(_Strict):
    name: str
    input: str


class ToolCall(_Strict):
    id: str
    type: Literal["function", "custom"]
    function: FunctionCall | None = None
    custom: CustomCall | None = None

    @model_validator(mode="after")
    def _check(self) -> ToolCall:
        if getattr(self, self.type) is None:
            raise ValueError(f"a '{self.type}' tool call needs '{self.type}'")
        return self

    def as_code(self) -> str:
        """The python-block text of this call: ``name(arguments)``."""
        if self.function is not None:
            return f"{self.function.name}({self.function.arguments})"
        if self.custom is not None:
            return f"{self.custom.name}({self.custom.input})"
        return ""


class AudioRef(_Strict):
    id: str


class _Message(_Strict):
    name: str | None = None  # accepted; nanochat's format has no speaker names

    def text(self) -> str:
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(p.text if isinstance(p, TextPart) else p.value for p in content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: str | TextParts


class UserMessage(_Message):
    role: Literal["user"]
    content: str | TextParts


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | AssistantParts | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    audio: AudioRef | None = None  # a reference to an earlier audio reply; nothing to render


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | TextParts
    tool_call_id: str


class FunctionMessage(_Message):
    role: Literal["function"]
    name: str
    content: str | None = None


ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _role_tag(value: Any) -> str | None:
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    if role == "developer":
        return "system"
    return role if isinstance(role, str) else None


Message = Annotated[
    Annotated[SystemMessage, Tag("system")]
    | Annotated[UserMessage, Tag("user")]
    | Annotated[AssistantMessage, Tag("assistant")]
    | Annotated[ToolMessage, Tag("tool")]
    | Annotated[FunctionMessage, Tag("function")],
    Discriminator(_role_tag),
]


def assistant_parts(text: str) -> list[dict[str, str]]:
    """Assistant text → nanochat parts, turning the tool markup back into python/output blocks."""
    parts: list[dict[str, str]] = []
    pos = 0
    for m in _MARKUP.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos : m.start()]})
        if m.group(1) is not None:
            parts.append({"type": "python", "text": m.group(1)})
        else:
            parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def _assistant_side(i: int, m: AssistantMessage | ToolMessage | FunctionMessage) -> list[dict[str, str]]:
    if isinstance(m, ToolMessage | FunctionMessage):
        return [{"type": "python_output", "text": m.text()}]
    if m.content is None and not (m.tool_calls or m.function_call or m.refusal is not None or m.audio):
        raise MessageError(
            f"messages.{i}.content",
            f"messages.{i}: an assistant message needs 'content' unless it has 'tool_calls', "
            "'function_call' or 'refusal'",
        )
    parts = assistant_parts(m.text() or (m.refusal or ""))
    calls = [c.as_code() for c in m.tool_calls or []]
    if m.function_call is not None:
        calls.append(f"{m.function_call.name}({m.function_call.arguments})")
    return parts + [{"type": "python", "text": code} for code in calls]


def to_conversation(messages: list[Any]) -> tuple[list[dict[str, Any]], bool]:
    """OpenAI messages → (nanochat messages, alternating from user; whether the last turn stays open).

    Raises :class:`MessageError` where OpenAI does: a ``tool`` message that answers no call of the
    assistant message before it, or an assistant ``tool_calls`` entry left without its result.
    """
    turns: list[dict[str, Any]] = []
    open_calls: dict[str, int] = {}  # tool_call_id -> index of the assistant message that made the call
    for i, m in enumerate(messages):
        if isinstance(m, ToolMessage):
            if m.tool_call_id not in open_calls:
                raise MessageError(
                    f"messages.{i}.tool_call_id",
                    f"messages.{i}: a 'tool' message must answer a tool call of the assistant message before "
                    f"it; no pending call has id {m.tool_call_id!r}",
                )
            del open_calls[m.tool_call_id]
        else:
            _check_answered(open_calls)
        if isinstance(m, AssistantMessage):
            open_calls = {c.id: i for c in m.tool_calls or []}
        if isinstance(m, SystemMessage | UserMessage):
            text = m.text()
            if turns and turns[-1]["role"] == "user":
                turns[-1]["content"] = PART_SEPARATOR.join(t for t in (turns[-1]["content"], text) if t)
            else:
                turns.append({"role": "user", "content": text})
            continue
        parts = _assistant_side(i, m)
        if not turns:
            turns.append({"role": "user", "content": ""})
        if turns[-1]["role"] == "assistant":
            previous = turns[-1]["content"]
            if previous and parts and previous[-1]["type"] == "text" and parts[0]["type"] == "text":
                previous[-1] = {"type": "text", "text": previous[-1]["text"] + PART_SEPARATOR + parts[0]["text"]}
                parts = parts[1:]
            previous.extend(parts)
        else:
            turns.append({"role": "assistant", "content": parts})
    _check_answered(open_calls)
    return turns, turns[-1]["role"] == "assistant"


def _check_answered(open_calls: dict[str, int]) -> None:
    if open_calls:
        index = next(iter(open_calls.values()))
        raise MessageError(
            f"messages.{index}.tool_calls",
            f"messages.{index}: an assistant message with 'tool_calls' must be followed by tool messages "
            f"answering each tool_call_id; unanswered: {', '.join(open_calls)}",
        )


def render_prompt(tokenizer: Any, messages: list[Any]) -> list[int]:
    """Prompt ids for the reply: the conversation, then an assistant turn to write (or to continue)."""
    conversation, open_turn = to_conversation(messages)
    if not open_turn:
        return tokenizer.render_for_completion({"messages": conversation}, allow_empty=True)
    ids, _ = tokenizer.render_conversation({"messages": conversation}, max_tokens=1 << 62, allow_empty=True)
    return ids[:-1]  # drop the closing assistant_end: the reply continues the last assistant turn
