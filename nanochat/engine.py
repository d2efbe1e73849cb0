"""The inference engine: one batched, KV-cached token generator for the CLI, evals and the server.

Sequences live in slots of one :class:`~nanochat.kv_cache.KVCache`. ``add`` queues a request;
every ``step`` first decodes one token for each running sequence, then spends up to
``prefill_chunk`` prompt tokens prefilling queued requests (long prompts take several steps, so
running streams are never stalled for long). A finished or cancelled sequence frees its slot at
once (the last slot moves into the hole so running rows stay a contiguous prefix of the cache).
A request with ``n`` samples is prefilled once and its KV copied into ``n`` slots; each slot
then samples its own first token with its own seeded generator.

The decode step (:mod:`nanochat.engine_decode`) is one forward for all rows (optionally compiled);
the next tokens are chosen for the whole batch at once: one argmax for the greedy rows,
one :func:`~nanochat.sampling.sample_rows` call for the sampled ones, the tool's forced tokens
for the rest. What each token does to its sequence (tool, UTF-8-safe text, stop strings, stops)
is :mod:`nanochat.engine_seq`; the request and event types are :mod:`nanochat.engine_types`. A
prefix cache reuses the KV of recent prompts sharing a prefix (multi-turn chats).

The engine is not thread-safe: one thread calls ``add``/``step``/``cancel`` (the server's
scheduler runs all three on its engine thread and is the only admission bound: the engine queues
without limit). ``generate*`` drive ``step`` themselves (other requests' events are kept for the
next external ``step``).

Faults stay with their owner: an exception while handling one sequence (sampling, tool,
detokenizer, stop strings) finishes only that sequence with ``finish_reason="error"``; a failed
prefill forward fails only its request; a failed batched decode forward fails exactly the rows in
it. ``step`` goes on with everything else and does not raise for these.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from nanochat.common import get_logger
from nanochat.engine_decode import CompileSetting, Decoder
from nanochat.engine_seq import Seq, TokenRules, choose_tokens, logprobs_of, token_logprobs
from nanochat.engine_types import (
    Completion,
    ContextLengthError,
    EngineError,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    answer_room,
    check_token_ids,
    fit_context,
)
from nanochat.prefix_cache import PrefixCache
from nanochat.sampling import sample_token

__all__ = [
    "Completion", "ContextLengthError", "Engine", "EngineError", "SamplingParams", "TokenEvent",
    "answer_room", "sample_token",
]

log = get_logger("nanochat.engine")


@dataclass
class _Request:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    seqs: list[Seq]
    prefilled: int = 0  # prompt tokens already in the staging slot
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # params.prompt_logprobs: tokens 1..


class Engine:
    """Continuous-batching generator over a GPT and its tokenizer (see the module docstring).

    ``compile``: ``torch.compile`` the decode step: ``False`` (default: one-off callers such as the CLI
    chat, evals and training samples would pay the compile for few tokens), ``"auto"`` (long-running
    servers: on CUDA every batch size; on CPU :meth:`warmup` keeps the batch sizes where a compiled
    step measures faster, typically the small ones), ``True`` (every batch size, also on CPU). See
    :mod:`nanochat.engine_decode`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 16,
        max_seq_len: int | None = None,
        prefill_chunk: int = 256,
        max_total_tokens: int | None = None,
        prefix_cache: PrefixCache | bool = True,
        compile: CompileSetting = False,
    ):
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.max_seq_len = max_seq_len or model.config.sequence_len
        self.max_total_tokens = max_total_tokens or max_batch_size * self.max_seq_len
        self.compile = compile
        if prefix_cache is True:
            prefix_cache = PrefixCache(max_tokens=4 * self.max_seq_len)
        self.prefix_cache: PrefixCache | None = prefix_cache or None
        self._rules = TokenRules.of(tokenizer, self.max_seq_len)
        self._device = model.lm_head.weight.device
        self._cache = None  # allocated on first use: (max_batch_size + 1) slots, the last for prefill
        self._decoder: Decoder | None = None
        self._slots: list[Seq] = []  # running sequences; slot i of the cache belongs to _slots[i]
        self._waiting: deque[_Request] = deque()
        self._prefilling: _Request | None = None
        self._last_logits: torch.Tensor | None = None
        self._stash: list[TokenEvent] = []  # events of others seen while generate() drives step()
        self._live: dict[int, _Request] = {}  # requests with unfinished samples
        self._next_id = 0
        self.tokens_generated = 0
        self.seq_errors = 0  # sequences finished with finish_reason "error"
        self.forward_failures = 0  # model forwards (decode batch or one prefill) that raised
        self.last_error: str | None = None  # message of the latest forward failure

    # ---- continuous-batching core ---------------------------------------------------------

    def add(self, prompt_tokens: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id (shared by its ``n`` samples). Prefill happens in ``step``.

        Raises :class:`EngineError` for a request no engine state can serve (``n`` above the batch
        size, an empty prompt, token ids outside the vocabulary) and :class:`ContextLengthError` for
        a prompt that fills the context in strict mode.
        """
        return self._enqueue(prompt_tokens, params or SamplingParams()).seq_id

    def _enqueue(self, prompt_tokens: Sequence[int], params: SamplingParams) -> _Request:
        if params.n > self.max_batch_size:
            raise EngineError(
                f"n={params.n} exceeds the engine's max_batch_size {self.max_batch_size}; lower n"
            )
        check_token_ids(prompt_tokens, self.model.config.vocab_size)
        prompt, params = fit_context(list(prompt_tokens), params, self.max_seq_len, self.tokenizer.get_bos_token_id())
        seq_id, self._next_id = self._next_id, self._next_id + 1
        seqs = [self._rules.new_seq(seq_id, i, params, prompt, self._device) for i in range(params.n)]
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

    def warmup(self) -> float:
        """Build the compiled decode step for every batch size now (a no-op when not compiling), so
        the first requests do not pay for it; returns seconds. Call before any request is running.
        With ``compile="auto"`` on CPU this is also where the batch sizes that run compiled are chosen
        (by timing both steps; without ``warmup`` such an engine decodes eagerly).

        The graphs are built under ``torch.inference_mode`` (how the server's scheduler steps); a
        caller stepping under plain ``no_grad`` triggers one more build per batch size.
        """
        if self._slots or self._prefilling:
            raise EngineError("warmup() must run before any request is decoding")
        self._ensure_cache()
        with torch.inference_mode():
            return self._decoder.warmup()

    @property
    def decode_compiled(self) -> bool:
        """Whether decode steps run a compiled graph (False until the cache exists, or after a fallback)."""
        return self._decoder is not None and self._decoder.compiled

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
            "decode_compiled": self.decode_compiled,
            "decode_compiled_buckets": self._decoder.compiled_buckets if self._decoder is not None else [],
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
        requests = [self._enqueue(p, sp) for p, sp in zip(prompts, plist)]
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

    # ---- internals -----------------------------------------------------------------------------

    def _ensure_cache(self):
        if self._cache is None:
            # Normal (not inference-mode) tensors: callers may step under inference_mode and cancel outside it.
            with torch.inference_mode(False):
                self._cache = self.model.new_kv_cache(self.max_batch_size + 1, self.max_seq_len)
            self._decoder = Decoder(self.model, self._cache, self.max_batch_size, self.compile)
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
        self._prefilling = request  # set first: if anything below raises, step() fails this request
        cache, staging = self._ensure_cache(), self.max_batch_size
        cache.seqlens[staging] = 0
        if self.prefix_cache is not None and not request.params.prompt_logprobs:  # scoring needs every position
            reused, k, v = self.prefix_cache.lookup(request.prompt)
            if reused:
                cache.k[:, staging, :reused] = k
                cache.v[:, staging, :reused] = v
                cache.seqlens[staging] = reused
                request.prefilled = reused
        return request

    def _prefill(self, request: _Request, budget: int) -> int:
        """Run up to ``budget`` prompt tokens through the staging slot; returns how many ran."""
        start = request.prefilled
        chunk = request.prompt[start : start + budget]
        idx = torch.tensor([chunk], dtype=torch.long, device=self._device)
        staging = self.max_batch_size
        logits = self.model(idx, kv_cache=self._cache.rows(staging, staging + 1))
        request.prefilled += len(chunk)
        self._last_logits = logits[0, -1]
        if request.params.prompt_logprobs:  # position i predicts prompt token i + 1: same forward, no second pass
            targets = request.prompt[start + 1 : start + 1 + len(chunk)]
            request.prompt_logprobs += logprobs_of(logits[0, : len(targets)], targets, request.params.logprobs or 0)
        return len(chunk)

    def _start_decoding(self, request: _Request) -> list[TokenEvent]:
        """Copy the prompt KV into ``n`` slots and choose each sample's first token."""
        cache, staging, plen = self._cache, self.max_batch_size, len(request.prompt)
        if self.prefix_cache is not None:
            self.prefix_cache.insert(request.prompt, cache.k[:, staging, :plen], cache.v[:, staging, :plen])
        placed = []
        events = []
        for seq in request.seqs:
            slot = len(self._slots)
            self._slots.append(seq)
            try:
                cache.copy_prefix(staging, slot, plen)
                seq.cached = plen
                placed.append(seq)
            except Exception as err:  # this sample alone fails
                events.append(self._fail(seq, err))
        first = self._choose_and_emit(placed, self._last_logits.expand(len(placed), -1))
        if request.params.prompt_logprobs:
            scored = tuple(request.prompt_logprobs)
            first = [e if e.finish_reason == "error" else replace(e, prompt_logprobs=scored) for e in first]
        events += first
        cache.seqlens[staging] = 0
        self._prefilling = None
        return events

    def _decode(self) -> list[TokenEvent]:
        slots = self._slots
        try:
            logits = self._decoder([s.next_input for s in slots], [s.cached for s in slots])
        except Exception as err:  # the batched forward failed: exactly the rows in it fail
            self._forward_failed(err, "decode")
            return [self._fail(seq, err, trace=False) for seq in slots]
        for seq in slots:
            seq.cached += 1
        return self._choose_and_emit(slots, logits)

    def _choose_and_emit(self, seqs: list[Seq], logits: torch.Tensor) -> list[TokenEvent]:
        """Choose the next token of every row of ``logits`` (row r belongs to ``seqs[r]``) and record it."""
        events = []
        choices = choose_tokens(seqs, logits)
        try:
            scored = token_logprobs(seqs, logits, choices)
        except Exception as err:  # noqa: BLE001 - only the rows that asked for logprobs fail
            choices = [err if s.params.logprobs is not None else c for s, c in zip(seqs, choices)]
            scored = {}
        for r, (seq, choice) in enumerate(zip(seqs, choices)):
            if isinstance(choice, Exception):  # no token for this row (e.g. no usable logits)
                events.append(self._fail(seq, choice))
                continue
            try:
                self.tokens_generated += 1
                event = seq.accept(*choice)
                if r in scored:
                    event = replace(event, logprob=scored[r])
                events.append(event)
            except Exception as err:  # tool, detokenizer or stop matching of this row
                events.append(self._fail(seq, err))
        return events

    def _fail(self, seq: Seq, err: BaseException, trace: bool = True) -> TokenEvent:
        """Finish ``seq`` with ``finish_reason="error"`` (its slot is freed by ``_reap``)."""
        message = f"{type(err).__name__}: {err}"
        log.error("sequence %d.%d failed: %s", seq.seq_id, seq.index, message, exc_info=err if trace else None)
        self.seq_errors += 1
        return seq.fail(message)

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

    def _reap(self, store: bool = True) -> None:
        """Free the slots of finished sequences (highest slot first, filling holes from the end)."""
        cache = self._cache
        for slot in range(len(self._slots) - 1, -1, -1):
            seq = self._slots[slot]
            if not seq.finished:
                continue
            if store and self.prefix_cache is not None and seq.index == 0 and seq.finish_reason != "error":
                n = seq.cached
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
