"""Log-probabilities of one request in OpenAI's shapes: chat's ``logprobs.content[]`` and the text
completions' parallel lists (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``), with
the prompt's own logprobs when the client asked for ``echo``.

The values come from the engine (:class:`nanochat.engine_types.TokenLogprob`): ``log_softmax`` of the
model's raw logits over the full vocabulary, before temperature, top-k and top-p, computed in the same
batched step that chose the token (the prompt's in its prefill). A token's string is its bytes decoded
as UTF-8 with replacement (a token holding part of a multi-byte character shows U+FFFD; ``bytes`` in the
chat shape gives the exact bytes). Streaming sends each token's entry once, with the next chunk of its
choice.
"""

from __future__ import annotations

from typing import Any

from nanochat.serve.openai_types import ChatLogprobs, CompletionLogprobs


class Logprobs:
    """What one request collects: per choice (``choice = prompt * n + sample``) the generated tokens'
    logprobs, and with ``echo`` the prompt's. ``top``: alternatives per token (None: only echo asked);
    ``texts[g]``: prompt g as the client sent it (str), or None for token ids (decoded); a str prompt's
    first token is the BOS the server added, which takes no room in the echoed text. ``scored_only``:
    ``max_tokens: 0`` (the one token decoded is dropped). ``keep_end``: list the end-of-turn token too (text
    completions: it was generated and scored, so echo + ``max_tokens: 1`` always has one entry after the prompt,
    which lm-evaluation-harness relies on; chat leaves it out as it leaves it out of the reply)."""

    def __init__(self, tokenizer: Any, prompts: list[list[int]], n: int, top: int | None, echo: bool = False,
                 texts: list[str | None] | None = None, scored_only: bool = False, keep_end: bool = False):
        self.tokenizer, self.prompts, self.n, self.top = tokenizer, prompts, n, top
        self.echo, self.scored_only, self.keep_end = echo, scored_only, keep_end
        self.texts = texts or [None] * len(prompts)
        choices = len(prompts) * n
        self.generated: list[list[Any]] = [[] for _ in range(choices)]
        self.scored_prompt: list[tuple[Any, ...] | None] = [None] * choices
        self.sent = [0] * choices  # generated entries already streamed
        self.echoed = [False] * choices
        self.offset = [0] * choices  # text_offset of the next token
        self._tokens: dict[int, tuple[str, list[int]]] = {}

    def record(self, choice: int, event: Any) -> None:
        """Keep what a :class:`~nanochat.engine_types.TokenEvent` carries (merge calls this for every event)."""
        if event.prompt_logprobs is not None:
            self.scored_prompt[choice] = event.prompt_logprobs
        if event.logprob is None or self.scored_only or self.top is None or (event.ends_turn and not self.keep_end):
            return
        self.generated[choice].append(event.logprob)

    # ---- shapes ---------------------------------------------------------------------------------

    def echo_text(self, choice: int) -> str:
        """The prompt's text the first time ``choice`` is rendered with echo, else ''."""
        if not self.echo or self.echoed[choice]:
            return ""
        self.echoed[choice] = True
        g = choice // self.n
        text = self.texts[g]
        return text if text is not None else self.tokenizer.decode(self.prompts[g])

    def chat(self, choice: int) -> ChatLogprobs:
        """Entries not yet sent for ``choice`` (all of them for a whole response). Validated in one call
        from plain dicts: building ``1 + top`` models per token one by one was most of what logprobs cost
        a stream (bench_serve.py's logprobs run)."""
        return ChatLogprobs.model_validate({"content": [
            {**self._entry(lp.token_id, lp.logprob),
             "top_logprobs": [self._entry(t, v) for t, v in lp.top]}
            for lp in self._take(choice)
        ]})

    def completion(self, choice: int) -> CompletionLogprobs | None:
        """Legacy completions shape for the tokens not yet sent (echoed prompt first: its first token has
        ``null`` logprob, nothing predicts it). None when only ``echo`` was asked (no ``logprobs``)."""
        entries: list[tuple[int, float | None, dict[str, float] | None, bool]] = []
        if self.echo and self.scored_prompt[choice] is not None and not self._echo_done(choice):
            g = choice // self.n
            entries.append((self.prompts[g][0], None, None, self.texts[g] is not None))
            entries += [(lp.token_id, lp.logprob, self._top_dict(lp), False) for lp in self.scored_prompt[choice]]
            self.scored_prompt[choice] = ()  # sent
        entries += [(lp.token_id, lp.logprob, self._top_dict(lp), False) for lp in self._take(choice)]
        if self.top is None:
            return None
        out = CompletionLogprobs()
        for token_id, logprob, top, silent in entries:
            token = self._string(token_id)
            out.tokens.append(token)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(self.offset[choice])
            self.offset[choice] += 0 if silent else len(token)
        return out

    # ---- helpers --------------------------------------------------------------------------------

    def _echo_done(self, choice: int) -> bool:
        return self.scored_prompt[choice] == ()

    def _take(self, choice: int) -> list[Any]:
        new = self.generated[choice][self.sent[choice]:]
        self.sent[choice] = len(self.generated[choice])
        return new

    def _top_dict(self, lp: Any) -> dict[str, float] | None:
        out: dict[str, float] = {}
        for t, v in lp.top:  # best first: tokens whose strings collide (U+FFFD) keep the best value
            out.setdefault(self._string(t), v)
        return out

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token, raw = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": raw}

    def _token(self, token_id: int) -> tuple[str, list[int]]:
        """The token's string and its bytes (cached per request; the list is shared, never mutated)."""
        if token_id not in self._tokens:
            raw = self.tokenizer.decode_bytes([token_id])
            self._tokens[token_id] = (raw.decode("utf-8", "replace"), list(raw))
        return self._tokens[token_id]

    def _string(self, token_id: int) -> str:
        return self._token(token_id)[0]
