"""One sample's decoding state, and what each chosen token does to it.

:func:`choose_tokens` picks the next token of every running sample of a decode step at once.
A :class:`Seq` is one sample of a request, living in one cache slot. :meth:`Seq.accept` turns a
chosen token id into a :class:`~nanochat.engine_types.TokenEvent`: an end-of-turn id finishes the
sample (``ends_turn``); the python-calculator state machine queues the tool's forced tokens
(``<|output_start|>`` result ``<|output_end|>``, like nanochat); the incremental detokenizer and
the stop matcher make the UTF-8-safe text delta and cut at stop strings; ``max_tokens`` or the end
of the context finish it with ``"length"``. Any exception raised here belongs to this sample only:
the engine turns it into the sample's error event with :meth:`Seq.fail`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nanochat.detok import IncrementalDetokenizer, StopMatcher
from nanochat.engine_types import SamplingParams, TokenEvent, TokenLogprob
from nanochat.sampling import NO_USABLE_LOGITS, SamplingError, sample_rows, sample_token, seed_for
from nanochat.tools import format_result, use_calculator


@dataclass(frozen=True)
class TokenRules:
    """What a token id means to a sequence: the tokenizer's special ids and the context limit."""

    tokenizer: Any
    max_seq_len: int
    terminal: frozenset[int]  # ids that end the assistant's turn
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def of(cls, tokenizer: Any, max_seq_len: int) -> TokenRules:
        special = tokenizer.encode_special
        return cls(
            tokenizer,
            max_seq_len,
            frozenset({special("<|assistant_end|>"), tokenizer.get_bos_token_id()}),
            special("<|python_start|>"),
            special("<|python_end|>"),
            special("<|output_start|>"),
            special("<|output_end|>"),
        )

    def new_seq(
        self, seq_id: int, index: int, params: SamplingParams, prompt: list[int], device: torch.device
    ) -> Seq:
        """Sample ``index`` of a request; a sampled (non-greedy) one gets its own seeded generator."""
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed_for(params.seed, index))
        detok = IncrementalDetokenizer(lambda t: self.tokenizer.decode_bytes([t]))
        return Seq(seq_id, index, params, prompt, self, generator, detok, StopMatcher(params.stop))


@dataclass
class Seq:
    """Decoding state of one sample (one cache slot)."""

    seq_id: int
    index: int
    params: SamplingParams
    prompt: list[int]  # shared by the request's n samples
    rules: TokenRules
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    forced: deque[int] = field(default_factory=deque)
    python: list[int] | None = None  # tokens of an open python block
    next_input: int = -1  # last chosen token, fed at the next decode step
    cached: int = 0  # positions of this sample in its cache slot (next_input goes at this position)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None

    @property
    def samples(self) -> bool:
        """Whether the next token is drawn from the logits (not greedy, not forced by the tool)."""
        return not self.params.greedy and not self.forced

    def accept(self, token: int, forced: bool) -> TokenEvent:
        """Record ``token``: stop on end-of-turn, tool state, text delta, stop strings, length."""
        if token in self.rules.terminal:
            return self._finish(token, "", "stop", forced=False, ends_turn=True)
        self.tokens.append(token)
        self.next_input = token
        if self.params.use_tools:
            self._tool_step(token)
        delta = self.stopper.push(self.detok.push(token))
        if self.stopper.stopped:
            return self._finish(token, delta, "stop", forced)
        if len(self.tokens) >= self.params.max_tokens or len(self.prompt) + len(self.tokens) >= self.rules.max_seq_len:
            return self._finish(token, delta, "length", forced)
        self.text += delta
        return TokenEvent(self.seq_id, token, delta, index=self.index, forced=forced)

    def fail(self, message: str) -> TokenEvent:
        """Finish with ``finish_reason="error"``: the event carries no token and no text."""
        self.finished, self.finish_reason, self.error = True, "error", message
        return TokenEvent(self.seq_id, -1, "", True, "error", self.index, False, message)

    def _finish(self, token: int, delta: str, reason: str, forced: bool, ends_turn: bool = False) -> TokenEvent:
        tail = self.stopper.push(self.detok.flush())
        if not self.stopper.stopped:
            tail += self.stopper.flush()
        text = delta + tail
        self.text += text
        self.finished, self.finish_reason = True, reason
        return TokenEvent(self.seq_id, token, text, True, reason, self.index, forced, ends_turn=ends_turn)

    def _tool_step(self, token: int) -> None:
        """The calculator state machine."""
        rules = self.rules
        if token == rules.python_start:
            self.python = []
        elif token == rules.python_end and self.python is not None:
            expr = rules.tokenizer.decode(self.python)
            self.python = None
            value = use_calculator(expr)
            if value is not None:
                result = rules.tokenizer.encode(format_result(value))
                self.forced.extend([rules.output_start, *result, rules.output_end])
        elif self.python is not None:
            self.python.append(token)


def choose_tokens(seqs: list[Seq], logits: torch.Tensor) -> list[tuple[int, bool] | Exception]:
    """``(token, forced)`` for each row of ``logits`` (row r belongs to ``seqs[r]``): one argmax over the
    batch for greedy rows, one :func:`~nanochat.sampling.sample_rows` call for the sampled rows, the
    tool's queued token for forced rows. A row that gets no token gets the exception instead (e.g.
    :class:`~nanochat.sampling.SamplingError` for logits with nothing usable); other rows are unaffected.
    """
    if not seqs:
        return []
    out: list[tuple[int, bool] | Exception | None] = [None] * len(seqs)
    try:
        greedy = logits.argmax(dim=-1).tolist()
        rows = [r for r, s in enumerate(seqs) if s.samples]
        if rows:
            p = [seqs[r].params for r in rows]
            drawn, bad = sample_rows(logits[rows], [x.temperature for x in p], [x.top_k for x in p],
                                     [x.top_p for x in p], [seqs[r].generator for r in rows])
            for r, token, no_logits in zip(rows, drawn, bad):
                out[r] = SamplingError(NO_USABLE_LOGITS) if no_logits else (token, False)
    except Exception:  # noqa: BLE001 - the batched choice failed: choose row by row, so only bad rows fail
        return [_choose_one(seq, logits[r]) for r, seq in enumerate(seqs)]
    return [
        (seq.forced.popleft(), True) if seq.forced else choice if choice is not None else (greedy[r], False)
        for r, (seq, choice) in enumerate(zip(seqs, out))
    ]


def _choose_one(seq: Seq, logits: torch.Tensor) -> tuple[int, bool] | Exception:
    try:
        if seq.forced:
            return seq.forced.popleft(), True
        p = seq.params
        return sample_token(logits, p.temperature, p.top_k, p.top_p, seq.generator), False
    except Exception as err:  # noqa: BLE001 - this row alone fails
        return err


def logprobs_of(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """:class:`TokenLogprob` of ``tokens[r]`` under row ``r`` of ``logits`` ``(rows, vocab)`` with the ``top``
    best alternatives: ``log_softmax`` over the full vocabulary of the raw logits (before temperature,
    top-k, top-p), in fp32. One batched call for all rows (a decode step's rows that asked, or a prompt)."""
    if not tokens:
        return []
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = lp.topk(min(top, lp.size(-1)), dim=-1)
        alts = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alts = [()] * len(tokens)
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alts)]


def token_logprobs(seqs: list[Seq], logits: torch.Tensor, choices: list) -> dict[int, TokenLogprob]:
    """Logprobs of the chosen tokens (``choices`` from :func:`choose_tokens`), only for the rows whose
    request asked (others pay nothing), from this step's logits in one batched call; keyed by row."""
    rows = [r for r, s in enumerate(seqs) if s.params.logprobs is not None and not isinstance(choices[r], Exception)]
    if not rows:
        return {}
    top = max(seqs[r].params.logprobs for r in rows)
    scored = logprobs_of(logits[rows], [choices[r][0] for r in rows], top)
    return {r: replace(lp, top=lp.top[: seqs[r].params.logprobs]) for r, lp in zip(rows, scored)}
