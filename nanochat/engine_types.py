"""What callers of the inference engine pass in and get back: sampling settings, token events,
completions, and the errors a request can be refused with. No model, no tokenizer.

``SamplingParams`` is validated (pydantic) at the edge; :class:`TokenEvent` is one generated token
of one sample (``ends_turn`` marks the end-of-turn token so callers need not know the special ids);
:class:`Completion` is a finished sample. :func:`answer_room` is the context budget rule shared by
the engine (left-truncation, :func:`fit_context`) and the CLI chat (dropping whole turns).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nanochat.common import NanochatError, get_logger
from nanochat.sampling import GREEDY_BELOW

log = get_logger("nanochat.engine")

MAX_TOP_LOGPROBS = 20  # alternatives per position, as OpenAI's top_logprobs and vLLM's default cap


class SamplingParams(BaseModel):
    """How to generate. ``temperature < GREEDY_BELOW`` (e.g. 0) is greedy and ignores ``seed``.

    Admitted: finite ``temperature >= 0``; ``0 < top_p <= 1``; ``top_k >= 1``; ``seed`` in
    ``[-2**63, 2**64)`` (what ``torch.Generator.manual_seed`` takes). Every admitted combination
    samples without numerical errors.
    """

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: list[str] = Field(default_factory=list)
    n: int = Field(1, ge=1)
    strict_context: bool = False
    use_tools: bool = True  # run the python calculator on python_start … python_end
    # Log-probabilities (see TokenLogprob): None = none (the step pays nothing); k >= 0 = each chosen
    # token's logprob plus the k most likely alternatives; prompt_logprobs also scores the prompt.
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    prompt_logprobs: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class TokenLogprob:
    """The model's log-probability of one token at one position: ``log_softmax`` of the raw logits
    over the whole vocabulary, BEFORE temperature, top-k and top-p (as OpenAI and vLLM report them),
    and the ``top`` most likely ``(token_id, logprob)`` pairs there, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class EngineError(NanochatError):
    """A request the engine cannot serve as given."""


class ContextLengthError(EngineError):
    """The prompt alone fills the context (no room for one new token) and the caller asked for strict mode."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int):
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        super().__init__(
            f"the prompt of {prompt_tokens} tokens leaves no room for an answer in the context of {limit} tokens; "
            f"shorten it to at most {limit - answer_room(max_tokens, limit)} tokens"
        )


def answer_room(max_tokens: int, limit: int) -> int:
    """Tokens kept free for the answer when a prompt must be shortened: ``min(max_tokens, limit // 4)``
    (at least 1). The engine cuts an over-long prompt to ``limit - answer_room``; the CLI drops
    earliest turns until this much room is left."""
    return max(1, min(max_tokens, limit // 4))


def check_token_ids(prompt: Sequence[int], vocab: int) -> None:
    """Raise :class:`EngineError` naming the first prompt id outside ``[0, vocab)``."""
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise EngineError(f"prompt token id {bad} is out of range; ids must be in [0, {vocab})")


def fit_context(
    prompt: list[int], params: SamplingParams, limit: int, bos_id: int
) -> tuple[list[int], SamplingParams]:
    """The prompt and params to run in a context of ``limit`` tokens: ``max_tokens`` is an upper bound,
    capped to the room the prompt leaves (never a reason to evict prompt tokens). Only a prompt that
    alone fills the context (no room for one new token) is changed: strict mode raises
    :class:`ContextLengthError`; otherwise BOS (if first) and the prompt's tail are kept so that
    :func:`answer_room` tokens are free, with a warning. Raises :class:`EngineError` for an empty
    prompt. Turn-aware shortening (whole turns) is the caller's: see the CLI chat."""
    if not prompt:
        raise EngineError("the prompt is empty; pass at least one token (e.g. the bos token)")
    room = limit - len(prompt)
    if room < 1:
        if params.strict_context:
            raise ContextLengthError(len(prompt), params.max_tokens, limit)
        keep = limit - answer_room(params.max_tokens, limit)
        head = prompt[:1] if prompt[0] == bos_id and keep > 1 else []
        truncated = head + prompt[len(prompt) - (keep - len(head)) :]
        log.warning(
            "the prompt of %d tokens does not fit the context of %d: keeping %sits last %d tokens",
            len(prompt), limit, "BOS and " if head else "", keep - len(head),
        )
        prompt, room = truncated, limit - len(truncated)
    if params.max_tokens > room:
        params = params.model_copy(update={"max_tokens": room})
    return prompt, params


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``text`` is the UTF-8-safe text delta (may be empty).

    The event that finishes a sequence on a stop token carries that token's id; it is not part
    of :attr:`Completion.tokens` and adds no text beyond flushing held-back characters.
    A sequence that failed ends with ``finish_reason="error"``, ``error`` set, ``token_id=-1``
    and no text; the other sequences of the batch are not affected.

    ``ends_turn`` is True exactly for the event whose ``token_id`` ends the assistant's turn
    (``<|assistant_end|>`` or ``<|bos|>``; always ``finished`` with ``finish_reason="stop"``): that
    token is not part of the answer, so callers neither count nor keep it.
    """

    seq_id: int
    token_id: int
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "error"
    index: int = 0  # which of the request's n samples
    forced: bool = False  # injected by the tool, not sampled
    error: str | None = None  # "<ExceptionType>: <message>" when finish_reason == "error"
    ends_turn: bool = False  # token_id is an end-of-turn token (assistant_end / bos), not answer text
    logprob: TokenLogprob | None = None  # when params.logprobs is set (forced tokens too; not on errors)
    # When params.prompt_logprobs: on each sample's first event, one entry per prompt token after the first.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str
    index: int = 0
    prompt_tokens: int = 0
    error: str | None = None  # set when finish_reason == "error"
