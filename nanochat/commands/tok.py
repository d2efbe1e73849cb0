"""``nanochat tok train|eval``: train the BPE tokenizer and measure its compression.

``train`` reads the preset's pretraining shards (``$BASE/data/<source>/shard_*.parquet``, all but
the last, which is validation) or files given with ``--input`` (text, JSONL or parquet with a
``text`` column), caps each document and the total characters, and saves the tokenizer to
``$BASE/tokenizer`` with ``tok_train.json``. ``eval`` prints bytes/token for ours against
tiktoken's ``gpt2`` and ``cl100k_base`` (when their files are cached or downloadable) and writes
``tok_eval.json``. The library does the work (:mod:`nanochat.tokenizer`); this file is wiring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from nanochat.commands.config import add_preset_args
from nanochat.common import NanochatError, atomic_write_text, base_dir
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir, iter_capped

DATA_PREPARE_HINT = "nanochat data prepare --preset tiny"


# ---- training text -----------------------------------------------------------------------------


def shard_paths(source: str) -> list[Path]:
    """The parquet shards of a data source, in order (the last one is the validation shard)."""
    return sorted((base_dir() / "data" / source).glob("shard_*.parquet"))


def preset_train_texts(preset: Any) -> tuple[Iterator[str], str]:
    """Training documents of the preset's data source, and a description of where they come from.

    Uses the data module's reader when it is installed (it builds the builtin shards on demand);
    otherwise reads ``$BASE/data/<source>/shard_*.parquet`` (all but the last, the val shard).
    """
    source = preset.data.source
    prepare = DATA_PREPARE_HINT if preset.name == "tiny" else f"nanochat data prepare --preset {preset.name}"
    hint = (
        f"the tokenizer trains on the pretraining shards: prepare them with `{prepare}` "
        "(or train on your own files with `nanochat tok train --input FILE...`)"
    )
    try:
        from nanochat.data import pretrain_data
    except ImportError:
        pretrain_data = None
    if pretrain_data is not None and hasattr(pretrain_data, "iter_train_texts"):
        try:  # fail here, clearly, rather than inside the BPE trainer's iteration
            if hasattr(pretrain_data, "ensure_prepared"):
                pretrain_data.ensure_prepared(source)
        except NanochatError as err:
            raise NanochatError(f"{err}\n{hint}") from None
        return iter(pretrain_data.iter_train_texts(preset)), f"data/{source}"
    shards = shard_paths(source)
    if not shards:
        raise NanochatError(f"no pretraining shards under {base_dir() / 'data' / source}; {hint}")
    train = shards[:-1] if len(shards) > 1 else shards
    return _iter_parquet_texts(train), f"data/{source}"


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
            yield from _chunk_lines(path.read_text(encoding="utf-8", errors="replace"), doc_cap)


def _chunk_lines(text: str, size: int) -> Iterator[str]:
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
            total=total, unit="char", unit_scale=True, desc="reading text", file=sys.stderr, disable=None
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
) -> dict[str, Any]:
    """Train on the preset's shards (or ``inputs`` files), save, write ``tok_train.json``; return it.

    Sizes default to the preset's ``tokenizer`` section (the ``tiny`` preset when none is given).
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
        texts, source = preset_train_texts(preset)
    out_dir = Path(out_dir) if out_dir else default_tokenizer_dir()
    counter = _CharCounter(iter_capped(texts, max_chars=max_chars, doc_cap=doc_cap), total=max_chars)
    start = time.time()
    print(
        f"training a {vocab_size}-token BPE tokenizer on {source} (max {max_chars:,} chars)", file=sys.stderr
    )
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


def _train(args: argparse.Namespace) -> int:
    from nanochat.config import load_preset

    summary = train_tokenizer(
        load_preset(args.preset, args.overrides),
        inputs=args.input,
        vocab_size=args.vocab_size,
        max_chars=args.max_chars,
        doc_cap=args.doc_cap,
        out_dir=args.output,
    )
    print(
        f"trained tokenizer: vocab {summary['vocab_size']:,} on {summary['chars']:,} chars "
        f"({summary['documents']:,} docs) in {summary['seconds']:.1f}s -> {summary['path']}"
    )
    return 0


# ---- evaluation --------------------------------------------------------------------------------

# Our own short samples of a few kinds of text (not nanochat's); the shards are added when present.
SAMPLE_TEXTS = {
    "news": (
        "City officials announced on Tuesday that the riverside park will reopen next spring after a "
        "two-year restoration costing $14.2 million. The mayor said the project, delayed by flooding in "
        "2023, would add 3 kilometres of walking paths, a playground and a restored wetland. Residents "
        "who attended the briefing welcomed the news but asked about parking and evening lighting."
    ),
    "code": (
        "import heapq\n\n\ndef dijkstra(graph: dict[str, dict[str, int]], start: str) -> dict[str, int]:\n"
        '    """Shortest distances from start in a graph with non-negative weights."""\n'
        "    dist = {start: 0}\n    queue = [(0, start)]\n    while queue:\n"
        "        d, node = heapq.heappop(queue)\n        if d > dist.get(node, float('inf')):\n"
        "            continue\n        for nxt, w in graph[node].items():\n"
        "            if d + w < dist.get(nxt, float('inf')):\n                dist[nxt] = d + w\n"
        "                heapq.heappush(queue, (d + w, nxt))\n    return dist\n"
    ),
    "math": (
        "\\begin{theorem} For every integer $n \\ge 1$, $\\sum_{k=1}^{n} k^3 = \\left(\\frac{n(n+1)}{2}\\right)^2$. "
        "\\end{theorem}\n\\begin{proof} By induction on $n$: the case $n=1$ gives $1 = 1$. Assuming it for $n$, "
        "$\\sum_{k=1}^{n+1} k^3 = \\frac{n^2(n+1)^2}{4} + (n+1)^3 = \\frac{(n+1)^2(n+2)^2}{4}$. \\end{proof}\n"
        "Numerically, 17 * 23 = 391 and 2^10 = 1024; 3.14159 rounds to 3.14."
    ),
    "multilingual": (
        "오늘 아침 서울에는 비가 내렸지만 오후에는 맑아질 것으로 예상됩니다. "
        "東京の図書館は来月から開館時間を延長します。 "
        "今天的会议推迟到下午三点。 "
        "La bibliothèque municipale ouvrira ses portes plus tôt dès lundi prochain. "
        "Der Zug nach München fährt heute mit zwanzig Minuten Verspätung ab. "
        "Сегодня в Москве ожидается снег и сильный ветер."
    ),
    "science": (
        "Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent "
        "reactions, chlorophyll absorbs photons and water is split, releasing oxygen; the Calvin cycle then "
        "fixes carbon dioxide using ATP and NADPH. Mitochondria later oxidize the sugar, and the proton "
        "gradient across their inner membrane drives ATP synthase."
    ),
}

BASELINES = ("gpt2", "cl100k_base")

# tiktoken caches downloads under sha1(url); knowing the URLs lets us tell "cached" without a network call.
_BASELINE_URLS = {
    "gpt2": [
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    ],
    "cl100k_base": ["https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"],
}


def _tiktoken_cache_dir() -> Path | None:
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _is_cached(name: str) -> bool:
    cache = _tiktoken_cache_dir()
    urls = _BASELINE_URLS.get(name)
    if cache is None or not urls:
        return False
    return all((cache / hashlib.sha1(url.encode()).hexdigest()).exists() for url in urls)


def load_baseline(name: str, timeout_s: float = 10.0) -> Tokenizer | None:
    """A stock tiktoken encoding, or None when it is neither cached nor downloadable within ``timeout_s``."""
    if not _is_cached(name) and os.environ.get("NANOCHAT_OFFLINE"):
        return None
    result: dict[str, Any] = {}

    def fetch() -> None:
        try:
            result["tok"] = Tokenizer.from_pretrained_tiktoken(name)
        except NanochatError:
            result["tok"] = None

    worker = threading.Thread(target=fetch, daemon=True)  # a hung DNS lookup must not hang the CLI
    worker.start()
    worker.join(timeout=None if _is_cached(name) else timeout_s)
    return result.get("tok")


def shard_eval_texts(source: str, max_chars: int = 1_000_000) -> dict[str, str]:
    """First row group of the first train shard and of the val shard, newline-joined (when present).

    Capped at ``max_chars`` so the table stays quick on big row groups (ratios barely move).
    """
    import pyarrow.parquet as pq

    shards = shard_paths(source)
    out: dict[str, str] = {}
    picks = {"train-shard": shards[0], "val-shard": shards[-1]} if len(shards) > 1 else {}
    for kind, path in picks.items():
        pf = pq.ParquetFile(path)
        if "text" in pf.schema_arrow.names and pf.num_row_groups:
            out[kind] = "\n".join(pf.read_row_group(0, columns=["text"]).column("text").to_pylist())[
                :max_chars
            ]
    return out


def compression_table(
    tokenizer: Tokenizer, texts: dict[str, str], baselines: dict[str, Tokenizer | None]
) -> list[dict]:
    """Per text: bytes, tokens and bytes/token for ours and each baseline (None when unavailable)."""
    rows = []
    for kind, text in texts.items():
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            raise NanochatError(f"tokenizer round-trip failed on the '{kind}' text")
        n_bytes = len(text.encode("utf-8"))
        row: dict[str, Any] = {
            "text": kind,
            "bytes": n_bytes,
            "ours": {"tokens": len(ids), "ratio": n_bytes / len(ids)},
        }
        for name, base in baselines.items():
            if base is None:
                row[name] = None
                continue
            n = len(base.enc.encode_ordinary(text))
            # diff > 0: ours needs fewer tokens than the baseline on this text.
            row[name] = {"tokens": n, "ratio": n_bytes / n, "diff_pct": 100.0 * (n - len(ids)) / n}
        rows.append(row)
    return rows


def format_table(rows: list[dict], baselines: Iterable[str]) -> str:
    names = list(baselines)
    header = f"{'text':<14}{'bytes':>9}{'ours tok':>10}{'ours b/t':>10}"
    for name in names:
        header += f"{name + ' tok':>18}{'b/t':>7}{'diff%':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        line = f"{r['text']:<14}{r['bytes']:>9}{r['ours']['tokens']:>10}{r['ours']['ratio']:>10.2f}"
        for name in names:
            b = r[name]
            line += (
                f"{'n/a':>18}{'':>7}{'':>8}"
                if b is None
                else f"{b['tokens']:>18}{b['ratio']:>7.2f}{b['diff_pct']:>+8.1f}"
            )
        lines.append(line)
    return "\n".join(lines)


def evaluate_tokenizer(
    tokenizer_dir: str | Path | None = None,
    preset: Any | None = None,
    offline: bool = False,
    timeout: float = 10.0,
    echo: bool = True,
) -> dict[str, Any]:
    """Compression table of the tokenizer vs the tiktoken baselines; writes and returns ``tok_eval.json``."""
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir()
    tokenizer = Tokenizer.load(tok_dir)
    texts = dict(SAMPLE_TEXTS)
    source = preset.data.source if preset is not None else _tokenizer_source(tok_dir)
    if source:
        texts.update(shard_eval_texts(source))
    baselines = {name: (None if offline else load_baseline(name, timeout)) for name in BASELINES}
    rows = compression_table(tokenizer, texts, baselines)
    if echo:
        print(
            f"compression (bytes per token, higher is better) of {tok_dir} (vocab {tokenizer.vocab_size:,})"
        )
        print(format_table(rows, BASELINES))
        for name, base in baselines.items():
            if base is None:
                print(f"{name}: not available offline (tiktoken could not load or download its files)")
    result = {
        "tokenizer": str(tok_dir),
        "vocab_size": tokenizer.vocab_size,
        "baselines": {name: base is not None for name, base in baselines.items()},
        "rows": rows,
    }
    atomic_write_text(tok_dir / "tok_eval.json", json.dumps(result, indent=2))
    return result


def _tokenizer_source(tok_dir: Path) -> str | None:
    """The data source a tokenizer was trained on (from tok_train.json), else the tiny preset's."""
    train = tok_dir / "tok_train.json"
    if train.exists():
        recorded = json.loads(train.read_text()).get("source", "")
        if recorded.startswith("data/"):
            return recorded.removeprefix("data/")
    from nanochat.config import load_preset

    return load_preset("tiny").data.source


def _eval(args: argparse.Namespace) -> int:
    from nanochat.config import load_preset

    preset = load_preset(args.preset, args.overrides)
    evaluate_tokenizer(args.tokenizer, preset, offline=args.offline, timeout=args.timeout)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tok", help="train / evaluate the BPE tokenizer")
    tsub = p.add_subparsers(dest="tok_command", metavar="ACTION", required=True)

    train = tsub.add_parser("train", help="train the tokenizer on the preset's data or --input files")
    add_preset_args(train)
    train.add_argument("--vocab-size", type=int, help="total vocab incl. 9 special tokens (default: preset)")
    train.add_argument("--max-chars", type=int, help="stop after this many characters (default: preset)")
    train.add_argument(
        "--doc-cap", type=int, help="truncate each document to this many chars (default: preset)"
    )
    train.add_argument(
        "--input", nargs="+", metavar="FILE", help="train on these .txt/.jsonl/.parquet files instead"
    )
    train.add_argument(
        "--output", metavar="DIR", help="where to save (default: $NANOCHAT_BASE_DIR/tokenizer)"
    )
    train.set_defaults(func=_train)

    ev = tsub.add_parser("eval", help="compression ratio vs tiktoken gpt2 / cl100k_base")
    add_preset_args(ev)
    ev.add_argument(
        "--tokenizer", metavar="DIR", help="tokenizer dir (default: $NANOCHAT_BASE_DIR/tokenizer)"
    )
    ev.add_argument("--offline", action="store_true", help="skip the tiktoken baselines")
    ev.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a baseline download")
    ev.set_defaults(func=_eval)
