"""``nanochat chat``: talk to a checkpoint in the terminal (REPL) or once with ``-p PROMPT``.

Tokens are streamed as the engine produces them. The conversation is kept as token ids (exactly
what the model saw, tool calls and their outputs included), so multi-turn context is faithful.
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


class ChatSession:
    """Multi-turn state: the conversation's token ids, plus the engine that extends them."""

    def __init__(self, engine: Any, tokenizer: Any, params: Any, system: str | None = None):
        self.engine, self.tokenizer, self.params, self.system = engine, tokenizer, params, system
        special = tokenizer.encode_special
        self.user_start, self.user_end = special("<|user_start|>"), special("<|user_end|>")
        self.assistant_start, self.assistant_end = (
            special("<|assistant_start|>"),
            special("<|assistant_end|>"),
        )
        self.terminal = {self.assistant_end, tokenizer.get_bos_token_id()}
        self.clear()

    def clear(self) -> None:
        self.tokens: list[int] = [self.tokenizer.get_bos_token_id()]
        self.turns = 0

    def reply(self, user_text: str, out: TextIO) -> str:
        """Append the user turn, stream the assistant's answer to ``out``, and return its text."""
        if self.turns == 0 and self.system:  # the reference merges system into the first user turn
            user_text = f"{self.system}\n\n{user_text}"
        self.tokens += [
            self.user_start,
            *self.tokenizer.encode(user_text),
            self.user_end,
            self.assistant_start,
        ]
        pieces: list[str] = []
        generated: list[int] = []
        stream = self.engine.generate(list(self.tokens), self.params)
        try:
            for events in stream:
                event = events[0]
                if not (event.finished and event.finish_reason == "stop" and event.token_id in self.terminal):
                    generated.append(event.token_id)
                if event.text:
                    pieces.append(event.text)
                    out.write(event.text)
                    out.flush()
                if event.finished:
                    break
        finally:
            _close_stream(stream)  # frees the engine slot now, also when interrupted mid-answer
            # Close the turn the way the model was trained to, whether it stopped by itself, hit
            # max_tokens or was interrupted (Ctrl-C): the history stays a well-formed conversation.
            generated.append(self.assistant_end)
            self.tokens += generated
            self.turns += 1
        return "".join(pieces)


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
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same answer)")
    p.add_argument("--system", help="system prompt, merged into the first user message")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("-v", "--verbose", action="store_true", help="print timing to stderr")
    p.set_defaults(func=_chat)
