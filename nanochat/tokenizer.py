"""Byte-level BPE tokenizer (trained with ``rustbpe``, run with ``tiktoken``) and chat rendering.

What it is: nanochat's tokenizer, bit for bit in behaviour — the GPT-4 split pattern with digit
runs grouped 1–2, ``vocab_size - 9`` byte/merge ranks, and the 9 special tokens appended as the
last 9 ids. It also renders conversations to ``(ids, mask)`` for training and prompts for
completion. What it is not: a model-side component — it knows nothing about tensors except
``token_bytes`` (needed for bits-per-byte).

On disk (a directory): ``tokenizer.json`` (pattern, special tokens, vocab size, fingerprint) +
``mergeable_ranks.tiktoken`` (tiktoken's own text format, ``base64 rank`` per line) — readable
without pickle — plus ``tokenizer.pkl`` (a pickled ``tiktoken.Encoding``, nanochat's layout) and
``token_bytes.pt`` for interop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import pickle
from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import tiktoken

from nanochat.common import NanochatError, atomic_write_bytes, atomic_write_text, base_dir
from nanochat.conversation import validate_conversation

# GPT-4's cl100k pattern, except digit runs are split into groups of 1-2 (not 1-3): at 32K vocab
# this gave nanochat the best val bpb of the three variants it tried.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Order matters: these take ids V-9 .. V-1.
SPECIAL_TOKENS = [
    "<|bos|>",  # document delimiter, starts every document and conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # tool call written by the assistant
    "<|python_end|>",
    "<|output_start|>",  # tool output injected by the runtime
    "<|output_end|>",
]

FORMAT_VERSION = 1
RANKS_FILE = "mergeable_ranks.tiktoken"
META_FILE = "tokenizer.json"
PICKLE_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.pt"


def default_tokenizer_dir(base: str | PathLike | None = None) -> Path:
    """``<base>/tokenizer``: where ``nanochat tok train`` saves (``base`` default ``$NANOCHAT_BASE_DIR``)."""
    return base_dir(base) / "tokenizer"


class Tokenizer:
    """A ``tiktoken.Encoding`` plus nanochat's special tokens and conversation rendering."""

    def __init__(self, enc: tiktoken.Encoding, bos: str = "<|bos|>"):
        self.enc = enc
        self.bos_token_id = self.encode_special(bos)

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train byte-level BPE on ``texts`` to ``vocab_size`` total ids (incl. the 9 specials)."""
        import rustbpe

        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), num_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
        if len(ranks) != num_ranks:
            raise NanochatError(
                f"the training text was too small to learn {num_ranks - 256} merges (got {len(ranks) - 256}); "
                "use more text or a smaller tokenizer.vocab_size"
            )
        return cls.from_ranks(bpe.get_pattern(), ranks)

    @classmethod
    def from_ranks(cls, pattern: str, ranks: dict[bytes, int]) -> Tokenizer:
        offset = len(ranks)
        specials = {tok: offset + i for i, tok in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name="rustbpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc)

    @classmethod
    def from_pretrained_tiktoken(cls, name: str) -> Tokenizer:
        """A stock tiktoken encoding (``gpt2``, ``cl100k_base``); BOS is ``<|endoftext|>``.

        These need tiktoken's files, which it downloads; offline this raises NanochatError.
        """
        try:
            enc = tiktoken.get_encoding(name)
        except Exception as err:  # tiktoken raises requests/HTTP errors of many kinds offline
            raise NanochatError(f"tiktoken encoding '{name}' is not available offline ({type(err).__name__})") from err
        return cls(enc, bos="<|endoftext|>")

    @classmethod
    def load(cls, directory: str | Path | None = None) -> Tokenizer:
        """Load from a directory written by :meth:`save` (no pickle involved; default
        :func:`default_tokenizer_dir`)."""
        directory = Path(directory) if directory else default_tokenizer_dir()
        meta_path, ranks_path = directory / META_FILE, directory / RANKS_FILE
        if not meta_path.exists() or not ranks_path.exists():
            raise NanochatError(
                f"no tokenizer in {directory} (missing {META_FILE} or {RANKS_FILE}); "
                "train one with `nanochat tok train` (or run `nanochat run --preset tiny`)"
            )
        try:
            meta = json.loads(meta_path.read_text())
            ranks = _read_ranks(ranks_path)
        except (ValueError, KeyError) as err:
            raise NanochatError(f"corrupt tokenizer files in {directory}: {err}") from err
        if meta.get("special_tokens") != {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}:
            raise NanochatError(f"{meta_path}: special tokens do not match this version of nanochat")
        tok = cls.from_ranks(meta["pattern"], ranks)
        if tok.vocab_size != meta["vocab_size"]:
            raise NanochatError(f"{meta_path}: vocab_size {meta['vocab_size']} != {tok.vocab_size} ranks+specials")
        return tok

    def save(self, directory: str | Path | None = None) -> Path:
        """Write the portable files plus nanochat's ``tokenizer.pkl`` and ``token_bytes.pt`` (default
        directory :func:`default_tokenizer_dir`)."""
        import torch

        directory = Path(directory) if directory else default_tokenizer_dir()
        directory.mkdir(parents=True, exist_ok=True)
        ranks_text = _format_ranks(self.enc._mergeable_ranks)
        atomic_write_text(directory / RANKS_FILE, ranks_text)
        atomic_write_text(directory / META_FILE, json.dumps(self.describe(), indent=2))
        atomic_write_bytes(directory / PICKLE_FILE, pickle.dumps(self.enc))
        tmp = directory / f".{TOKEN_BYTES_FILE}.tmp"
        torch.save(self.token_bytes(), tmp)
        tmp.replace(directory / TOKEN_BYTES_FILE)
        return directory

    def describe(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.enc.name,
            "pattern": self.enc._pat_str,
            "vocab_size": self.vocab_size,
            "special_tokens": {t: self.encode_special(t) for t in SPECIAL_TOKENS},
            "fingerprint": self.fingerprint,
        }

    @property
    def fingerprint(self) -> str:
        """A short hash of pattern + ranks + specials; checkpoints record it to catch mismatches."""
        h = hashlib.sha256()
        h.update(self.enc._pat_str.encode())
        h.update(_format_ranks(self.enc._mergeable_ranks).encode())
        h.update(json.dumps(sorted(self.enc._special_tokens.items())).encode())
        return h.hexdigest()[:16]

    # ---- encoding -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def encode_special(self, token: str) -> int:
        try:
            return self.enc.encode_single_token(token)
        except KeyError:
            raise ValueError(f"unknown special token {token!r}") from None

    def _as_id(self, token: str | int | None) -> int | None:
        if token is None or isinstance(token, int):
            return token
        return self.encode_special(token)

    def encode(
        self,
        text: str | Sequence[str],
        prepend: str | int | None = None,
        append: str | int | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Encode ordinary text (special-token strings in it are NOT special); lists are batched."""
        pre, post = self._as_id(prepend), self._as_id(append)
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return ([pre] if pre is not None else []) + ids + ([post] if post is not None else [])
        if not all(isinstance(t, str) for t in text):
            raise TypeError("encode expects a str or a list of str")
        batch = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
        for ids in batch:
            if pre is not None:
                ids.insert(0, pre)
            if post is not None:
                ids.append(post)
        return batch

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def id_to_token(self, token_id: int) -> str:
        return self.enc.decode([token_id])

    def token_bytes(self):
        """int32 tensor ``[vocab]``: UTF-8 byte length of each token, 0 for special tokens.

        Computed from the raw token bytes (not via str, which would mis-size partial code points).
        """
        import torch

        specials = set(self.enc._special_tokens.values())
        sizes = [0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)]
        return torch.tensor(sizes, dtype=torch.int32)

    # ---- conversations --------------------------------------------------------------------

    def render_conversation(
        self, conversation: Any, max_tokens: int = 2048, allow_empty: bool = False
    ) -> tuple[list[int], list[int]]:
        """Render a chat to ``(ids, mask)``; mask 1 marks tokens the assistant is trained to produce.

        bos(0) · user_start(0) text(0) user_end(0) · assistant_start(0) text(1) assistant_end(1) …
        Assistant content may be a list of parts: ``text`` (1), ``python`` → python_start code
        python_end (all 1), ``python_output`` → output_start text output_end (all 0: the tool
        writes it at inference time). A leading system message is merged into the first user
        message with a blank line. Raises ValueError naming the message index and the rule.
        ``allow_empty`` admits empty contents (an empty turn: start and end tokens only), which a
        chat request may send but training data must not.
        """
        messages = validate_conversation(conversation, allow_empty)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], supervised: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([supervised] * len(tokens))

        special = self.encode_special
        add(self.bos_token_id, 0)
        for message in messages:
            if message["role"] == "user":
                add(special("<|user_start|>"), 0)
                add(self.encode(message["content"]), 0)
                add(special("<|user_end|>"), 0)
                continue
            add(special("<|assistant_start|>"), 0)
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                tokens = self.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, 1)
                elif part["type"] == "python":
                    add(special("<|python_start|>"), 1)
                    add(tokens, 1)
                    add(special("<|python_end|>"), 1)
                else:  # python_output: produced by the tool at test time, never trained on
                    add(special("<|output_start|>"), 0)
                    add(tokens, 0)
                    add(special("<|output_end|>"), 0)
            add(special("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: Any, allow_empty: bool = False) -> list[int]:
        """Prompt ids for generating the last assistant turn: drop it, render, add assistant_start."""
        messages = validate_conversation(conversation, allow_empty)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("render_for_completion: the conversation must end with a user message")
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=1 << 62, allow_empty=allow_empty)
        return ids + [self.encode_special("<|assistant_start|>")]


def _format_ranks(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda x: x[1]))


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line:
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError as err:
            raise ValueError(f"{path.name} line {line_no}: {err}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path.name}: ranks are not a contiguous 0..N-1 range")
    return ranks


def iter_capped(texts: Iterable[str], max_chars: int, doc_cap: int) -> Iterator[str]:
    """Yield documents truncated to ``doc_cap`` chars, stopping once ``max_chars`` were yielded."""
    total = 0
    for text in texts:
        text = text[:doc_cap]
        yield text
        total += len(text)
        if total >= max_chars:
            return
