"""``nanochat chat``: talk to a checkpoint in the terminal (REPL) or once with ``-p PROMPT``.

Tokens are streamed as the engine produces them; calculator calls show as ``[calculator] 2+2 = 4``
lines. The conversation is kept as token ids (exactly what the model saw, tool calls and their
outputs included), so multi-turn context is faithful. ``--max-tokens`` is capped to the room the
prompt leaves; when the conversation gets too long for the context, the earliest exchanges are
dropped (see :meth:`ChatSession.fit`).
This module is wiring: generation is :class:`nanochat.engine.Engine`, loading is
:mod:`nanochat.checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from nanochat.common import NanochatError

HELP_TEXT = """commands:
  /clear   start a new conversation
  /quit    leave (also /exit, Ctrl-D)
  /help    show this help"""


@contextlib.contextmanager
def spinner(message: str, stream: TextIO | None = None) -> Iterator[None]:
    """A small spinner on stderr while a slow step runs; silent when stderr is not a terminal."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield
        return
    done = threading.Event()

    def spin() -> None:
        for frame in itertools.cycle("|/-\\"):
            if done.wait(0.1):
                break
            stream.write(f"\r{frame} {message}")
            stream.flush()
        stream.write("\r" + " " * (len(message) + 2) + "\r")
        stream.flush()

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@dataclass
class Turn:
    """One finished exchange: the user's text (before any system merge) and the assistant's token
    ids exactly as generated, tool calls and injected outputs included, ending in assistant_end."""

    user: str
    answer: list[int]


class ChatSession:
    """Multi-turn state: the conversation's turns, plus the engine that extends them.

    The prompt for each answer is rendered from the kept turns (``tokens``). ``--max-tokens`` is an
    upper bound the engine caps to the room the prompt leaves; when fewer than
    :func:`nanochat.engine.answer_room` tokens would be left, the earliest whole exchanges are
    dropped (the first one, which carries the system prompt, last of all), with a one-line notice.
    """

    def __init__(self, engine: Any, tokenizer: Any, params: Any, system: str | None = None):
        self.engine, self.tokenizer, self.params, self.system = engine, tokenizer, params, system
        special = tokenizer.encode_special
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start, self.assistant_end = (
            special("<|assistant_start|>"),
            special("<|assistant_end|>"),
        )
        self.tools = ToolView(tokenizer)
        self.clear()

    def clear(self) -> None:
        self.history: list[Turn] = []

    @property
    def turns(self) -> int:
        return len(self.history)

    @property
    def tokens(self) -> list[int]:
        """The conversation so far as the model sees it: BOS, then every kept exchange."""
        return self._render(self.history)

    def _render(self, turns: list[Turn], question: str | None = None) -> list[int]:
        ids = [self.tokenizer.get_bos_token_id()]
        for i, turn in enumerate([*turns, Turn(question, [])] if question is not None else turns):
            text = f"{self.system}\n\n{turn.user}" if i == 0 and self.system else turn.user  # as the reference
            ids += [self.user_start, *self.tokenizer.encode(text), self.user_end, self.assistant_start, *turn.answer]
        return ids

    def fit(self, question: str, err: TextIO | None = None) -> list[int]:
        """The prompt for answering ``question``: the history plus the new user turn, with the earliest
        exchanges dropped (one notice line on ``err``) while fewer than ``answer_room`` tokens would
        be left for the answer. Raises NanochatError when the question alone does not fit."""
        from nanochat.engine import answer_room

        limit = self.engine.max_seq_len
        need = answer_room(self.params.max_tokens, limit)
        kept = list(self.history)
        prompt = self._render(kept, question)
        while len(prompt) + need > limit and kept:
            del kept[1 if len(kept) > 1 else 0]  # keep the first (system) exchange as long as possible
            prompt = self._render(kept, question)
        if len(prompt) + need > limit:
            raise NanochatError(
                f"the message is {len(prompt)} prompt tokens; the model's context of {limit} tokens must also "
                f"hold at least {need} for the answer: shorten the message (or lower --max-tokens)"
            )
        dropped = len(self.history) - len(kept)
        if dropped:
            self.history = kept
            print(f"(context full: dropped the {dropped} earliest exchange{'s' if dropped > 1 else ''} "
                  f"to fit {limit} tokens)", file=err or sys.stderr, flush=True)
        return prompt

    def reply(self, user_text: str, out: TextIO, err: TextIO | None = None) -> str:
        """Append the user turn, stream the assistant's answer to ``out``, and return the text shown."""
        prompt = self.fit(user_text, err)
        shown = self.tools.start(out)
        generated: list[int] = []
        stream = self.engine.generate(prompt, self.params)
        try:
            for events in stream:
                event = events[0]
                if event.finish_reason == "error":  # the engine could not continue this answer
                    raise NanochatError(f"generation failed: {event.error}")
                if not event.ends_turn:
                    generated.append(event.token_id)
                self.tools.push(event.token_id, event.text)
                if event.finished:
                    break
        finally:
            _close_stream(stream)  # frees the engine slot now, also when interrupted mid-answer
            self.tools.finish()
            # Close the turn the way the model was trained to, whether it stopped by itself, hit
            # max_tokens or was interrupted (Ctrl-C): the history stays a well-formed conversation.
            generated.append(self.assistant_end)
            self.history.append(Turn(user_text, generated))
        return "".join(shown)


class ToolView:
    """Streams an answer's text, showing calculator calls readably instead of their special tokens.

    ``<|python_start|>2+2<|python_end|><|output_start|>4<|output_end|>`` is shown as a line
    ``[calculator] 2+2 = 4`` (dim on a terminal); a call the calculator refused shows
    ``[calculator] expr (no result)``. Only the display changes: the token history stays exact.
    """

    def __init__(self, tokenizer: Any):
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def start(self, out: TextIO) -> list[str]:
        """Begin an answer written to ``out``; returns the list that collects the shown text."""
        self.out, self.shown, self.state, self.call, self.result = out, [], "text", "", ""
        self.at_line_start = True
        return self.shown

    def push(self, token: int, text: str) -> None:
        if self.state == "call":
            if token == self.python_end:
                self.state = "called"
            else:
                self.call += text
            return
        if self.state == "output":
            if token == self.output_end:
                self._show_call(f"{self.call.strip()} = {self.result.strip()}")
            else:
                self.result += text
            return
        if self.state == "called":
            if token == self.output_start:
                self.state = "output"
                return
            self._show_call(f"{self.call.strip()} (no result)")
        if token == self.python_start:
            self.state, self.call, self.result = "call", "", ""
        elif text:
            self._write(text)

    def finish(self) -> None:
        """End of the answer (also when interrupted): show a call that was still open."""
        if self.state == "output":
            self._show_call(f"{self.call.strip()} = {self.result.strip()}")
        elif self.state in ("call", "called"):
            self._show_call(f"{self.call.strip()} (no result)")

    def _show_call(self, what: str) -> None:
        self.state = "text"
        line = f"[calculator] {what}"
        dim = getattr(self.out, "isatty", lambda: False)()
        self._write(("" if self.at_line_start else "\n") + (f"\033[2m{line}\033[0m" if dim else line) + "\n",
                    shown=("" if self.at_line_start else "\n") + line + "\n")

    def _write(self, text: str, shown: str | None = None) -> None:
        self.shown.append(text if shown is None else shown)
        self.out.write(text)
        self.out.flush()
        self.at_line_start = text.endswith("\n")


def _close_stream(stream: Iterator[Any]) -> None:
    """Close an engine stream; its cleanup touches inference tensors, so run it in inference mode."""
    import torch

    with torch.inference_mode():
        stream.close()


def _sampling_params(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from nanochat.engine import SamplingParams

    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,  # 0 = off
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValidationError as err:
        problems = "; ".join(
            f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in err.errors()
        )
        raise NanochatError(f"invalid sampling options: {problems}") from None


def load_session(args: argparse.Namespace) -> ChatSession:
    """Resolve and load the checkpoint (with a spinner), build the engine and the session."""
    from nanochat.checkpoint import load_checkpoint, resolve_checkpoint
    from nanochat.common import autodetect_device

    params = _sampling_params(args)  # bad flags fail before the (slow) load
    path = resolve_checkpoint(args.checkpoint)
    device = args.device or autodetect_device()
    with spinner(f"loading {path}"):
        ckpt = load_checkpoint(path, device=device)
        from nanochat.engine import Engine

        engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=1)
    meta = ckpt.meta
    print(
        f"loaded {meta.get('stage', '?')} checkpoint {ckpt.tag} step {meta.get('step', '?')} "
        f"({ckpt.model.num_params() / 1e6:.1f}M params) from {path}",
        file=sys.stderr,
    )
    return ChatSession(engine, ckpt.tokenizer, params, system=args.system)


def answer_once(
    checkpoint: str | Path | None,
    prompt: str,
    temperature: float = 0.0,
    max_tokens: int = 64,
    seed: int | None = None,
    out: TextIO | None = None,
) -> str:
    """Load ``checkpoint`` (a dir, stage name or None for the latest), stream one answer, return it."""
    args = argparse.Namespace(
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        device=None,
        system=None,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=None,
        top_p=None,
        seed=seed,
    )
    out = out or sys.stdout
    text = load_session(args).reply(prompt, out)
    out.write("\n")
    out.flush()
    return text


def repl(session: ChatSession, stdin: TextIO, out: TextIO) -> int:
    interactive = stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        print("nanochat — type a message, /help for commands, /quit to leave", file=out)
    while True:
        if interactive:
            try:
                line = input("\nyou> ") + "\n"  # input() gives line editing and history
            except EOFError:  # Ctrl-D
                out.write("\n")
                return 0
        else:
            line = stdin.readline()
            if not line:
                return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/clear":
            session.clear()
            print("(conversation cleared)", file=out)
            continue
        if text == "/help":
            print(HELP_TEXT, file=out)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; /help lists the commands", file=out)
            continue
        if interactive:
            out.write("assistant> ")
        try:
            session.reply(text, out)
        except KeyboardInterrupt:  # stop this answer, keep the REPL
            out.write(" (interrupted)")
        except NanochatError as err:  # e.g. a message longer than the context: say so, keep the REPL
            print(f"error: {err}", file=sys.stderr, flush=True)
        out.write("\n")
        out.flush()


def _chat(args: argparse.Namespace) -> int:
    session = load_session(args)
    if args.prompt is not None:
        start = time.time()
        session.reply(args.prompt, sys.stdout)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.verbose:
            print(f"({time.time() - start:.2f}s)", file=sys.stderr)
        return 0
    return repl(session, sys.stdin, sys.stdout)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a trained model (REPL, or one answer with -p)")
    p.add_argument("-p", "--prompt", help="answer this one message and exit")
    p.add_argument(
        "--checkpoint",
        help="checkpoint dir, tag dir, or stage name base|mid|sft (default: latest of sft, mid, base)",
    )
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument(
        "--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50, 0 = off)"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default off)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="most tokens per answer (default 256; capped to the room the prompt leaves in the context)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same answer)")
    p.add_argument("--system", help="system prompt, merged into the first user message")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")
    p.set_defaults(func=_chat)
