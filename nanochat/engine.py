"""The inference engine: one batched, KV-cached token generator for the CLI, evals and the server.

Sequences live in slots of one :class:`~nanochat.model.KVCache`. ``add`` queues a request;
every ``step`` first decodes one token for each running sequence, then spends up to
``prefill_chunk`` prompt tokens prefilling queued requests (long prompts take several steps, so
running streams are never stalled for long). A finished or cancelled sequence frees its slot at
once (the last slot moves into the hole so running rows stay a contiguous prefix of the cache).
A request with ``n`` samples is prefilled once and its KV copied into ``n`` slots; each slot
then samples its own first token with its own seeded generator.

Per sequence: sampling (:mod:`nanochat.sampling`: greedy below a tiny temperature, else
temperature / top-k / top-p), the python-calculator tool (``python_start … python_end`` →
forced ``output_start result output_end``), UTF-8-safe streaming text and stop strings. A prefix cache reuses the KV of
recent prompts sharing a prefix (multi-turn chats). The engine works on token ids; it uses the
tokenizer only for special ids, streaming text and the calculator. ``add``/``step``/``cancel``
take one lock, so a server may call ``add``/``cancel`` from its event loop while a worker thread
runs ``step``; ``generate*`` drive ``step`` themselves (other requests' events are kept for the
next external ``step``).

Faults stay with their owner: an exception while handling one sequence (sampling, tool,
detokenizer, stop strings) finishes only that sequence with ``finish_reason="error"``; a failed
prefill forward fails only its request; a failed batched decode forward fails exactly the rows in
it. ``step`` goes on with everything else and does not raise for these.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nanochat.common import NanochatError, get_logger
from nanochat.detok import IncrementalDetokenizer, StopMatcher
from nanochat.prefix_cache import PrefixCache
from nanochat.sampling import GREEDY_BELOW, sample_token, seed_for
from nanochat.tools import format_result, use_calculator

log = get_logger("nanochat.engine")


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

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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


class QueueFullError(EngineError):
    """Too many requests are waiting; retry later."""


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``text`` is the UTF-8-safe text delta (may be empty).

    The event that finishes a sequence on a stop token carries that token's id; it is not part
    of :attr:`Completion.tokens` and adds no text beyond flushing held-back characters.
    A sequence that failed ends with ``finish_reason="error"``, ``error`` set, ``token_id=-1``
    and no text; the other sequences of the batch are not affected.
    """

    seq_id: int
    token_id: int
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "error"
    index: int = 0  # which of the request's n samples
    forced: bool = False  # injected by the tool, not sampled
    error: str | None = None  # "<ExceptionType>: <message>" when finish_reason == "error"


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str
    index: int = 0
    prompt_tokens: int = 0
    error: str | None = None  # set when finish_reason == "error"


@dataclass
class _Seq:
    """Decoding state of one sample (one cache slot)."""

    seq_id: int
    index: int
    params: SamplingParams
    prompt: list[int]  # shared by the request's n samples
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    forced: deque[int] = field(default_factory=deque)
    python: list[int] | None = None  # tokens of an open python block
    next_input: int = -1  # last chosen token, fed at the next decode step
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class _Request:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    seqs: list[_Seq]
    prefilled: int = 0  # prompt tokens already in the staging slot


class Engine:
    """Continuous-batching generator over a GPT and its tokenizer (see the module docstring)."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        prefill_chunk: int = 256,
        max_total_tokens: int | None = None,
        max_waiting: int | None = None,
        prefix_cache: PrefixCache | bool = True,
    ):
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.max_seq_len = max_seq_len or model.config.sequence_len
        self.max_total_tokens = max_total_tokens or max_batch_size * self.max_seq_len
        self.max_waiting = max_waiting
        if prefix_cache is True:
            prefix_cache = PrefixCache(max_tokens=4 * self.max_seq_len)
        self.prefix_cache: PrefixCache | None = prefix_cache or None
        special = tokenizer.encode_special
        self._terminal = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self._python_start, self._python_end = special("<|python_start|>"), special("<|python_end|>")
        self._output_start, self._output_end = special("<|output_start|>"), special("<|output_end|>")
        self._cache = None  # allocated on first use: (max_batch_size + 1) slots, the last for prefill
        self._slots: list[_Seq] = []  # running sequences; slot i of the cache belongs to _slots[i]
        self._waiting: deque[_Request] = deque()
        self._prefilling: _Request | None = None
        self._stash: list[TokenEvent] = []  # events of others seen while generate() drives step()
        self._live: dict[int, _Request] = {}  # requests with unfinished samples
        self._lock = threading.RLock()
        self._next_id = 0
        self.tokens_generated = 0
        self.seq_errors = 0  # sequences finished with finish_reason "error"
        self.forward_failures = 0  # model forwards (decode batch or one prefill) that raised
        self.last_error: str | None = None  # message of the latest forward failure

    # ---- continuous-batching core ---------------------------------------------------------

    def add(self, prompt_tokens: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id (shared by its ``n`` samples). Prefill happens in ``step``."""
        return self._enqueue(prompt_tokens, params or SamplingParams()).seq_id

    def _enqueue(
        self, prompt_tokens: Sequence[int], params: SamplingParams, bounded: bool = True
    ) -> _Request:
        if params.n > self.max_batch_size:
            raise EngineError(
                f"n={params.n} exceeds the engine's max_batch_size {self.max_batch_size}; lower n"
            )
        if bounded and self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self._waiting)} requests are already waiting; retry later")
        self._check_token_ids(prompt_tokens)
        prompt, params = self._fit_context(list(prompt_tokens), params)
        with self._lock:
            seq_id, self._next_id = self._next_id, self._next_id + 1
            seqs = [self._new_seq(seq_id, i, params, prompt) for i in range(params.n)]
            request = _Request(seq_id, prompt, params, seqs)
            self._waiting.append(request)
            self._live[seq_id] = request
        return request

    def prompt_tokens(self, seq_id: int) -> int | None:
        """Prompt length of a live request after any left-truncation (for usage accounting)."""
        request = self._live.get(seq_id)
        return len(request.prompt) if request else None

    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """Decode one token for every running sequence, then prefill queued prompts (bounded)."""
        with self._lock:
            return self._step()

    def _step(self) -> list[TokenEvent]:
        events, self._stash = self._stash, []
        if self._slots:
            events += self._decode()
        budget = self.prefill_chunk
        while budget > 0:
            try:
                request = self._prefilling or self._admit()
                if request is None:
                    break
                budget -= self._prefill(request, budget)
            except Exception as err:  # the forward held only this request: only it fails
                if self._prefilling is None:
                    raise
                events += self._fail_prefill(self._prefilling, err)
                break
            if request.prefilled < len(request.prompt):
                break
            events += self._start_decoding(request)
        self._reap()
        return events

    @torch.no_grad()
    def cancel(self, seq_id: int) -> bool:
        """Stop a request now and free its slots; False if it is unknown or already finished."""
        with self._lock:
            return self._cancel(seq_id)

    def _cancel(self, seq_id: int) -> bool:
        found = False
        for request in list(self._waiting):
            if request.seq_id == seq_id:
                self._waiting.remove(request)
                found = True
        if self._prefilling is not None and self._prefilling.seq_id == seq_id:
            self._cache.seqlens[self.max_batch_size] = 0
            self._prefilling, found = None, True
        for seq in self._slots:
            if seq.seq_id == seq_id and not seq.finished:
                seq.finished, seq.finish_reason, found = True, "cancelled", True
        self._stash = [e for e in self._stash if e.seq_id != seq_id]
        self._live.pop(seq_id, None)
        self._reap(store=False)
        return found

    @property
    def num_running(self) -> int:
        return len(self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + (self._prefilling is not None)

    def has_work(self) -> bool:
        return bool(self._slots or self._waiting or self._prefilling or self._stash)

    def waiting_ids(self) -> set[int]:
        """Ids of requests still queued (not yet prefilling): untouched by any model forward so far."""
        return {r.seq_id for r in self._waiting}

    def stats(self) -> dict:
        out = {
            "running": self.num_running,
            "waiting": self.num_waiting,
            "tokens_generated": self.tokens_generated,
            "seq_errors": self.seq_errors,
            "forward_failures": self.forward_failures,
        }
        if self.prefix_cache is not None:
            out["prefix_cache"] = self.prefix_cache.stats()
        return out

    # ---- convenience ------------------------------------------------------------------------

    def generate(
        self, prompt_tokens: Sequence[int], params: SamplingParams | None = None
    ) -> Iterator[list[TokenEvent]]:
        """Yield this request's events step by step (``n`` rows from one prefill) until all finish."""
        request = self._enqueue(prompt_tokens, params or SamplingParams())
        try:
            while not all(s.finished for s in request.seqs):
                mine = self._stash_others(self.step(), {request.seq_id})
                if mine:
                    yield mine
        finally:
            self.cancel(request.seq_id)

    def generate_batch(
        self, prompt_tokens: Sequence[int], params: SamplingParams | None = None
    ) -> list[Completion]:
        """All ``n`` completions of one prompt, ordered by sample index."""
        return self.generate_many([prompt_tokens], params)[0]

    def generate_many(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[list[Completion]]:
        """Run many prompts through the batch together; ``result[i][j]`` is sample j of prompt i."""
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        requests = [self._enqueue(p, sp, bounded=False) for p, sp in zip(prompts, plist)]
        mine = {r.seq_id for r in requests}
        try:
            while not all(s.finished for r in requests for s in r.seqs):
                self._stash_others(self.step(), mine)
        finally:
            for r in requests:
                self.cancel(r.seq_id)
        return [
            [
                Completion(s.tokens, s.text, s.finish_reason or "length", s.index, len(r.prompt), s.error)
                for s in r.seqs
            ]
            for r in requests
        ]

    def _stash_others(self, events: list[TokenEvent], mine: set[int]) -> list[TokenEvent]:
        """Keep the events of ``mine``; others wait for the next external ``step`` call."""
        kept = []
        for event in events:
            (kept if event.seq_id in mine else self._stash).append(event)
        return kept

    def chat_stream(self, conversation, params: SamplingParams | None = None) -> Iterator[str]:
        """Text deltas of the assistant's reply to ``conversation`` (a dict with ``messages``).

        Raises :class:`EngineError` if the sequence fails (see :class:`TokenEvent`).
        """
        params = (params or SamplingParams()).model_copy(update={"n": 1})
        for events in self.generate(self.tokenizer.render_for_completion(conversation), params):
            for event in events:
                if event.finish_reason == "error":
                    raise EngineError(f"generation failed: {event.error}")
                if event.text:
                    yield event.text

    # ---- internals -----------------------------------------------------------------------------

    def _fit_context(self, prompt: list[int], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """The prompt and params to run: ``max_tokens`` is an upper bound, capped to the room the prompt
        leaves (never a reason to evict prompt tokens). Only a prompt that alone fills the context
        (no room for one new token) is changed: strict mode raises :class:`ContextLengthError`;
        otherwise BOS (if first) and the prompt's tail are kept so that :func:`answer_room` tokens are
        free, with a warning. Turn-aware shortening (whole turns) is the caller's: see the CLI chat."""
        if not prompt:
            raise EngineError("the prompt is empty; pass at least one token (e.g. the bos token)")
        limit = self.max_seq_len
        room = limit - len(prompt)
        if room < 1:
            if params.strict_context:
                raise ContextLengthError(len(prompt), params.max_tokens, limit)
            keep = limit - answer_room(params.max_tokens, limit)
            head = prompt[:1] if prompt[0] == self.tokenizer.get_bos_token_id() and keep > 1 else []
            truncated = head + prompt[len(prompt) - (keep - len(head)) :]
            log.warning(
                "the prompt of %d tokens does not fit the context of %d: keeping %sits last %d tokens",
                len(prompt), limit, "BOS and " if head else "", keep - len(head),
            )
            prompt, room = truncated, limit - len(truncated)
        if params.max_tokens > room:
            params = params.model_copy(update={"max_tokens": room})
        return prompt, params

    def _check_token_ids(self, prompt: Sequence[int]) -> None:
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise EngineError(f"prompt token id {bad} is out of range; ids must be in [0, {vocab})")

    def _new_seq(self, seq_id: int, index: int, params: SamplingParams, prompt: list[int]) -> _Seq:
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.model.lm_head.weight.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed_for(params.seed, index))
        return _Seq(
            seq_id,
            index,
            params,
            prompt,
            generator,
            IncrementalDetokenizer(self._token_bytes),
            StopMatcher(params.stop),
        )

    def _token_bytes(self, token_id: int) -> bytes:
        return self.tokenizer.decode_bytes([token_id])

    def _ensure_cache(self):
        if self._cache is None:
            # Normal (not inference-mode) tensors: callers may step under inference_mode and cancel outside it.
            with torch.inference_mode(False):
                self._cache = self.model.new_kv_cache(self.max_batch_size + 1, self.max_seq_len)
        return self._cache

    def _reserved_tokens(self) -> int:
        return sum(len(s.prompt) + s.params.max_tokens for s in self._slots)

    def _admit(self) -> _Request | None:
        """Start prefilling the head of the queue if it fits (slots and the total-token bound)."""
        if not self._waiting:
            return None
        request = self._waiting[0]
        n = request.params.n
        need = n * (len(request.prompt) + request.params.max_tokens)
        if len(self._slots) + n > self.max_batch_size:
            return None
        if self._slots and self._reserved_tokens() + need > self.max_total_tokens:
            return None
        self._waiting.popleft()
        self._prefilling = request  # set first: if anything below raises, _step fails this request
        cache, staging = self._ensure_cache(), self.max_batch_size
        cache.seqlens[staging] = 0
        if self.prefix_cache is not None:
            reused, k, v = self.prefix_cache.lookup(request.prompt)
            if reused:
                cache.k[:, staging, :reused] = k
                cache.v[:, staging, :reused] = v
                cache.seqlens[staging] = reused
                request.prefilled = reused
        self._prefilling = request
        return request

    def _prefill(self, request: _Request, budget: int) -> int:
        """Run up to ``budget`` prompt tokens through the staging slot; returns how many ran."""
        start = request.prefilled
        chunk = request.prompt[start : start + budget]
        device = self.model.lm_head.weight.device
        idx = torch.tensor([chunk], dtype=torch.long, device=device)
        staging = self.max_batch_size
        logits = self.model(idx, kv_cache=self._cache.rows(staging, staging + 1))
        request.prefilled += len(chunk)
        self._last_logits = logits[0, -1]
        return len(chunk)

    def _start_decoding(self, request: _Request) -> list[TokenEvent]:
        """Copy the prompt KV into ``n`` slots and choose each sample's first token."""
        cache, staging, plen = self._cache, self.max_batch_size, len(request.prompt)
        if self.prefix_cache is not None:
            self.prefix_cache.insert(request.prompt, cache.k[:, staging, :plen], cache.v[:, staging, :plen])
        events = []
        for seq in request.seqs:
            slot = len(self._slots)
            self._slots.append(seq)
            try:
                cache.copy_prefix(staging, slot, plen)
                events.append(self._emit(seq, *self._choose(seq, self._last_logits)))
            except Exception as err:  # this sample alone fails
                events.append(self._fail(seq, err))
        cache.seqlens[staging] = 0
        self._prefilling = None
        return events

    def _decode(self) -> list[TokenEvent]:
        device = self.model.lm_head.weight.device
        try:
            idx = torch.tensor([[s.next_input] for s in self._slots], dtype=torch.long, device=device)
            logits = self.model(idx, kv_cache=self._cache.rows(0, len(self._slots)))[:, -1]
            greedy = logits.argmax(dim=-1).tolist()
        except Exception as err:  # the batched forward failed: exactly the rows in it fail
            self._forward_failed(err, "decode")
            return [self._fail(seq, err, trace=False) for seq in self._slots]
        events = []
        for row, seq in enumerate(self._slots):
            try:
                if seq.params.greedy and not seq.forced:
                    events.append(self._emit(seq, greedy[row], False))
                else:
                    events.append(self._emit(seq, *self._choose(seq, logits[row])))
            except Exception as err:  # sampling, tool, detokenizer or stop matching of this row
                events.append(self._fail(seq, err))
        return events

    def _fail(self, seq: _Seq, err: BaseException, trace: bool = True) -> TokenEvent:
        """Finish ``seq`` with ``finish_reason="error"`` (its slot is freed by ``_reap``)."""
        message = f"{type(err).__name__}: {err}"
        log.error("sequence %d.%d failed: %s", seq.seq_id, seq.index, message, exc_info=err if trace else None)
        seq.finished, seq.finish_reason, seq.error = True, "error", message
        self.seq_errors += 1
        return TokenEvent(seq.seq_id, -1, "", True, "error", seq.index, False, message)

    def _fail_prefill(self, request: _Request, err: BaseException) -> list[TokenEvent]:
        """The prefill of ``request`` raised: end its samples with an error, free the staging slot."""
        self._forward_failed(err, "prefill")
        self._prefilling = None
        if self._cache is not None:
            self._cache.seqlens[self.max_batch_size] = 0
        self._live.pop(request.seq_id, None)
        return [self._fail(seq, err, trace=False) for seq in request.seqs]

    def _forward_failed(self, err: BaseException, what: str) -> None:
        self.forward_failures += 1
        self.last_error = f"{what} forward failed: {type(err).__name__}: {err}"
        log.error("%s", self.last_error, exc_info=err)

    def _choose(self, seq: _Seq, logits: torch.Tensor) -> tuple[int, bool]:
        """The next token and whether it was forced (tool output) rather than sampled."""
        if seq.forced:
            return seq.forced.popleft(), True
        p = seq.params
        return sample_token(logits, p.temperature, p.top_k, p.top_p, seq.generator), False

    def _emit(self, seq: _Seq, token: int, forced: bool) -> TokenEvent:
        """Record ``token`` for ``seq``: tool state, stop conditions, text delta."""
        self.tokens_generated += 1
        if token in self._terminal:
            return self._finish(seq, token, "", "stop", forced=False)
        seq.tokens.append(token)
        seq.next_input = token
        if seq.params.use_tools:
            self._tool_step(seq, token)
        delta = seq.stopper.push(seq.detok.push(token))
        if seq.stopper.stopped:
            return self._finish(seq, token, delta, "stop", forced)
        if len(seq.tokens) >= seq.params.max_tokens or len(seq.prompt) + len(seq.tokens) >= self.max_seq_len:
            return self._finish(seq, token, delta, "length", forced)
        seq.text += delta
        return TokenEvent(seq.seq_id, token, delta, index=seq.index, forced=forced)

    def _finish(self, seq: _Seq, token: int, delta: str, reason: str, forced: bool) -> TokenEvent:
        tail = seq.stopper.push(seq.detok.flush())
        if not seq.stopper.stopped:
            tail += seq.stopper.flush()
        text = delta + tail
        seq.text += text
        seq.finished, seq.finish_reason = True, reason
        return TokenEvent(seq.seq_id, token, text, True, reason, seq.index, forced)

    def _tool_step(self, seq: _Seq, token: int) -> None:
        """The calculator state machine of one sequence."""
        if token == self._python_start:
            seq.python = []
        elif token == self._python_end and seq.python is not None:
            expr = self.tokenizer.decode(seq.python)
            seq.python = None
            value = use_calculator(expr)
            if value is not None:
                result = self.tokenizer.encode(format_result(value))
                seq.forced.extend([self._output_start, *result, self._output_end])
        elif seq.python is not None:
            seq.python.append(token)

    def _reap(self, store: bool = True) -> None:
        """Free the slots of finished sequences (highest slot first, filling holes from the end)."""
        cache = self._cache
        for slot in range(len(self._slots) - 1, -1, -1):
            seq = self._slots[slot]
            if not seq.finished:
                continue
            if store and self.prefix_cache is not None and seq.index == 0 and seq.finish_reason != "error":
                n = int(cache.seqlens[slot])
                tokens = (seq.prompt + seq.tokens)[:n]
                self.prefix_cache.insert(tokens, cache.k[:, slot, :n], cache.v[:, slot, :n])
            last = len(self._slots) - 1
            if slot != last:
                cache.move_row(last, slot)
                self._slots[slot] = self._slots[last]
            self._slots.pop()
            cache.seqlens[last] = 0
            request = self._live.get(seq.seq_id)
            if request is not None and all(s.finished for s in request.seqs):
                del self._live[seq.seq_id]
