"""Pydantic models for the OpenAI-compatible HTTP API, and the OpenAI-shaped error.

Requests are validated here (ranges, types, unknown or unsupported fields) so the routes only
see well-formed values; every failure becomes :class:`APIError`, rendered as
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status. Responses serialize as
OpenAI's do: fields OpenAI leaves out when unset (a delta's ``role``/``content``) are left out,
the ones it sends as ``null`` (``logprobs``, ``finish_reason`` of a chunk) are ``null``. The chat
``messages`` models live in :mod:`nanochat.serve.messages`. This module knows nothing about the
engine or Ray.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from nanochat.serve.messages import ROLES, Message

MAX_N = 8  # choices per request; each choice is one sequence slot in the batch
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 20  # top alternatives per token: OpenAI's top_logprobs limit (its completions API stops at 5; vLLM at 20)

# Fields of the OpenAI API we accept in the schema but do not implement: sending a non-default
# value is a 400 naming the field (a silent ignore would return something the client did not ask for).
UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "function_call": None,
    "parallel_tool_calls": None,
    "response_format": None,
    "best_of": None,
    "suffix": None,
    "audio": None,
    "modalities": None,
    "prediction": None,
    "reasoning_effort": None,
}


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        message, param = _printable(message), _printable(param) if param is not None else None
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on a 429

    def __reduce__(self) -> tuple[Any, ...]:
        """Picklable with all its fields: a model replica raises it through a Serve handle (prefix routing)."""
        return type(self), (self.status, self.message, self.type, self.param, self.code, self.headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _printable(text: str) -> str:
    """``text`` with lone surrogates escaped: an error message must always encode as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class _Request(BaseModel):
    # Unknown fields are a 400 ("unrecognized request argument"), as OpenAI does.
    model_config = ConfigDict(extra="forbid")

    def unsupported_fields(self) -> list[str]:
        """Unsupported OpenAI fields the client set to something other than their default."""
        bad = []
        for name, default in UNSUPPORTED_DEFAULTS.items():
            value = getattr(self, name, default)
            if value is not None and value != default and not (name == "logprobs" and value is False):
                bad.append(name)
        return bad


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000, description="extension (extra_body); 0 = no top-k")
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted for compatibility; see UNSUPPORTED_DEFAULTS.
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _normalize(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree; send only one")
            self.max_tokens = self.max_completion_tokens
        if self.response_format == {"type": "text"}:
            self.response_format = None  # the default; anything else is unsupported
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    @property
    def top_k_logprobs(self) -> int | None:
        """Alternatives per token the engine must return, or None when no logprobs were asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt (lm-evaluation-harness)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _check_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 is only allowed with echo: true (to score the prompt)")
        return self

    @property
    def top_k_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("token-id prompts must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ---- responses ---------------------------------------------------------------------------------


class _OpenAIObject(BaseModel):
    """Fields named in ``_omit_if_none`` are left out of the JSON when None, as OpenAI does."""

    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self._omit_if_none)}


class Usage(BaseModel):
    """Token counts: each prompt once (however many choices ``n`` asks for), every choice's completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """``choices[].logprobs`` of a chat completion (or of one chunk: the tokens it carries)."""

    content: list[ChatTokenLogprob] | None = None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of a text completion (legacy shape): parallel lists, one entry per token;
    ``text_offset`` is each token's character offset in the choice's text (echoed prompt included)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class Delta(_OpenAIObject):
    _omit_if_none = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event. ``usage`` is sent (null but in the last event) only when the client asked for it."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanochat"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- validation errors → one OpenAI-shaped 400 ---------------------------------------------------

_UNION_LABELS = {"str", "int", "float", "bool", "none", "list", "dict"}  # pydantic's names of union members
_TAGS = set(ROLES) - {"developer"}  # the message union's tags, which pydantic puts after the index


def _param(loc: tuple[Any, ...]) -> list[str]:
    """A pydantic error location as the dotted path a client sent (``messages.0.content.1.type``)."""
    out: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out.append(str(part))
        elif i == 0 and part == "body":
            continue
        elif part in _UNION_LABELS or "[" in part:
            continue
        elif part in _TAGS and len(out) == 2 and out[0] == "messages":
            continue
        else:
            out.append(part)
    return out


def _pick(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The most telling error about the first bad field: the deepest, and not 'wrong type' if another says more."""
    head = _param(errors[0].get("loc", ()))[:2]
    same = [e for e in errors if _param(e.get("loc", ()))[:2] == head]
    depth = max(len(_param(e.get("loc", ()))) for e in same)
    deepest = [e for e in same if len(_param(e.get("loc", ()))) == depth]
    specific = [e for e in deepest if not str(e.get("type", "")).endswith("_type")]
    return (specific or deepest)[0]


def _shown(value: Any) -> str:
    if value is None or isinstance(value, dict | list):
        return ""
    text = repr(value)
    return f" (got {text[:100] + '…' if len(text) > 100 else text})"


def validation_error_to_api_error(errors: list[dict[str, Any]]) -> APIError:
    """Pydantic's errors for a request body → one 400 naming the first bad field (``param``)."""
    if not errors:
        return APIError(400, "invalid request body", code="invalid_value")
    e = _pick(errors)
    loc = _param(e.get("loc", ()))
    param = ".".join(loc) or None
    kind = str(e.get("type", ""))
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    got = e.get("input")
    if kind == "json_invalid":
        detail = str((e.get("ctx") or {}).get("error", msg))
        if not got:
            detail = "the body is empty"
        return APIError(
            400, f"We could not parse the JSON body of your request ({detail}); send one JSON object, UTF-8 encoded",
            code="invalid_json",
        )
    if not loc and kind in ("model_type", "model_attributes_type", "dict_type"):
        kind = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
                list: "an array"}.get(type(got), type(got).__name__)
        return APIError(400, f"the request body must be a JSON object, got {kind}", code="invalid_json")
    if kind == "extra_forbidden":
        raw = e.get("loc", ())[-1]
        param = ".".join([*loc[:-1], str(raw)]) if loc and loc[-1] == raw else str(raw)
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind in ("union_tag_invalid", "union_tag_not_found") and loc[:1] == ["messages"] and len(loc) == 2:
        if not isinstance(got, dict):
            return APIError(400, f"invalid value for '{param}': each message must be an object with a 'role'",
                            param=param, code="invalid_value")
        if "role" not in got:
            return APIError(400, f"'{param}.role' is a required property", param=f"{param}.role",
                            code="missing_required_parameter")
        return APIError(400, f"invalid value for '{param}.role': must be one of {', '.join(ROLES)}{_shown(got['role'])}",
                        param=f"{param}.role", code="invalid_value")
    if kind == "missing":
        return APIError(400, f"'{param}' is a required property", param=param, code="missing_required_parameter")
    text = f"invalid value for '{param}': {msg}{_shown(got)}" if param else f"{msg}{_shown(got)}"
    return APIError(400, text, param=param, code="invalid_value")
