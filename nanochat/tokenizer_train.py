"""Training the BPE tokenizer: where its text comes from, how much of it, and what is saved.

Text is the preset's pretraining shards (:func:`nanochat.sources.pretrain.iter_train_texts`: all
shards but the last, which is validation; builtin shards are built on demand) or files given as
``inputs`` (text, JSONL or parquet with a ``text`` column). Each document is cut to ``doc_cap``
characters and reading stops after ``max_chars`` (:func:`nanochat.tokenizer.iter_capped`). The
tokenizer is saved to ``<base>/tokenizer`` (or ``out_dir``) with ``tok_train.json``; ``base`` is the
artifacts root holding the shards too (default ``$NANOCHAT_BASE_DIR``).
The CLI (``nanochat tok train``) and the pipeline's ``tokenizer`` stage call :func:`train_tokenizer`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Iterator
from os import PathLike
from pathlib import Path
from typing import Any

from nanochat.common import NanochatError, atomic_write_text
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir, iter_capped


def preset_train_texts(preset: Any, base: str | PathLike | None = None) -> tuple[Iterator[str], str]:
    """Training documents of the preset's data source, and a description of where they come from.

    Raises :class:`~nanochat.common.NanochatError` naming ``nanochat data prepare`` (and ``--input``)
    when a downloaded source has no shards yet.
    """
    from nanochat.sources import pretrain

    source = preset.data.source
    hint = (
        f"the tokenizer trains on the pretraining shards: prepare them with "
        f"`nanochat data prepare --preset {preset.name}` "
        "(or train on your own files with `nanochat tok train --input FILE...`)"
    )
    try:  # fail here, clearly, rather than inside the BPE trainer's iteration
        pretrain.ensure_prepared(source, base=base)
    except NanochatError as err:
        raise NanochatError(f"{err}\n{hint}") from None
    return iter(pretrain.iter_train_texts(preset, base=base)), f"data/{source}"


def _iter_parquet_texts(paths: Iterable[Path], column: str = "text") -> Iterator[str]:
    import pyarrow.parquet as pq

    for path in paths:
        pf = pq.ParquetFile(path)
        if column not in pf.schema_arrow.names:
            raise NanochatError(f"{path} has no '{column}' column (columns: {pf.schema_arrow.names})")
        for i in range(pf.num_row_groups):
            yield from pf.read_row_group(i, columns=[column]).column(column).to_pylist()


def iter_input_files(paths: Iterable[str | Path], doc_cap: int) -> Iterator[str]:
    """Documents from text (chunked at line breaks to ``doc_cap``), JSONL (``text``) or parquet files."""
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise NanochatError(f"--input {path}: no such file")
        if path.suffix == ".parquet":
            yield from _iter_parquet_texts([path])
        elif path.suffix in (".jsonl", ".ndjson"):
            with path.open(encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise NanochatError(
                            f"{path} line {line_no}: expected a JSON object with 'text' ({err})"
                        ) from None
        else:
            yield from chunk_lines(path.read_text(encoding="utf-8", errors="replace"), doc_cap)


def chunk_lines(text: str, size: int) -> Iterator[str]:
    """Split a long text into pieces of at most ``size`` characters, preferring line boundaries."""
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


class _CharCounter:
    """Pass documents through while counting characters on a tqdm bar (stderr)."""

    def __init__(self, texts: Iterable[str], total: int):
        from tqdm import tqdm

        self.texts, self.chars, self.docs = texts, 0, 0
        self.bar = tqdm(
            total=total, unit="char", unit_scale=True, desc="reading text", file=sys.stderr, disable=None,
            leave=False,  # the text may end before max_chars: a bar left at 60% would read as unfinished
        )

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.chars += len(text)
            self.docs += 1
            self.bar.update(len(text))
            yield text
        self.bar.close()


def train_tokenizer(
    preset: Any | None = None,
    *,
    inputs: list[str | Path] | None = None,
    vocab_size: int | None = None,
    max_chars: int | None = None,
    doc_cap: int | None = None,
    out_dir: str | Path | None = None,
    base: str | PathLike | None = None,
) -> dict[str, Any]:
    """Train on the preset's shards (or ``inputs`` files), save, write ``tok_train.json``; return it.

    Sizes default to the preset's ``tokenizer`` section (the ``tiny`` preset when none is given).
    The summary holds ``vocab_size``, ``chars``, ``documents``, ``seconds``, ``source``,
    ``max_chars``, ``doc_cap``, ``fingerprint`` and ``path``. Raises
    :class:`~nanochat.common.NanochatError` when an input is missing or malformed, or yields no text.
    """
    if preset is None:
        from nanochat.config import load_preset

        preset = load_preset("tiny")
    settings = preset.tokenizer
    vocab_size = vocab_size or settings.vocab_size
    max_chars = max_chars or settings.max_chars
    doc_cap = doc_cap or settings.doc_cap
    if inputs:
        texts: Iterable[str] = iter_input_files(inputs, doc_cap)
        source = ", ".join(str(p) for p in inputs)
    else:
        texts, source = preset_train_texts(preset, base)
    out_dir = Path(out_dir) if out_dir else default_tokenizer_dir(base)
    print(
        f"training a {vocab_size}-token BPE tokenizer on {source} (max {max_chars:,} chars)", file=sys.stderr
    )  # before the bar starts drawing on the same stream
    counter = _CharCounter(iter_capped(texts, max_chars=max_chars, doc_cap=doc_cap), total=max_chars)
    start = time.time()
    tokenizer = Tokenizer.train_from_iterator(counter, vocab_size=vocab_size)
    seconds = time.time() - start
    if counter.chars == 0:
        raise NanochatError(f"{source} yielded no text to train on")
    tokenizer.save(out_dir)
    summary = {
        "vocab_size": tokenizer.vocab_size,
        "chars": counter.chars,
        "documents": counter.docs,
        "seconds": round(seconds, 3),
        "source": source,
        "max_chars": max_chars,
        "doc_cap": doc_cap,
        "fingerprint": tokenizer.fingerprint,
        "path": str(out_dir),
    }
    atomic_write_text(out_dir / "tok_train.json", json.dumps(summary, indent=2))
    return summary
