"""Tokenizer compression: bytes per token of ours against tiktoken's ``gpt2`` and ``cl100k_base``.

Texts: our own short samples of a few kinds (news, code, math, multilingual, science) plus the first
row group of the first train shard and of the val shard of the tokenizer's data source, when
present. Baselines load from tiktoken's cache or download (skipped offline or past a timeout, never
hanging). :func:`evaluate_tokenizer` writes ``tok_eval.json`` beside the tokenizer; the CLI
(``nanochat tok eval``) and the pipeline's ``tok_eval`` stage call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nanochat.common import NanochatError, atomic_write_text
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

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


def shard_eval_texts(source: str, max_chars: int = 1_000_000, base: str | os.PathLike | None = None) -> dict[str, str]:
    """First row group of the first train shard and of the val shard, newline-joined (when present).

    Capped at ``max_chars`` so the table stays quick on big row groups (ratios barely move).
    """
    import pyarrow.parquet as pq

    from nanochat.sources.pretrain import DataNotPreparedError, list_shards

    try:
        shards = list_shards(source, "all", base)
    except DataNotPreparedError:  # fewer than two shards: the sample texts alone
        return {}
    out: dict[str, str] = {}
    picks = {"train-shard": shards[0], "val-shard": shards[-1]}
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
    base: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Compression table of the tokenizer vs the tiktoken baselines; writes and returns ``tok_eval.json``.

    The result holds ``tokenizer`` (its dir), ``vocab_size``, ``baselines`` (name → loaded) and
    ``rows`` (:func:`compression_table`). Shard texts come from ``preset``'s data source, else the
    one recorded in ``tok_train.json``. Raises :class:`~nanochat.common.NanochatError` when a text
    does not round-trip. ``base``: the artifacts root of the default tokenizer and the shards
    (default ``$NANOCHAT_BASE_DIR``).
    """
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir(base)
    tokenizer = Tokenizer.load(tok_dir)
    texts = dict(SAMPLE_TEXTS)
    source = preset.data.source if preset is not None else _tokenizer_source(tok_dir)
    if source:
        texts.update(shard_eval_texts(source, base=base))
    baselines = {name: (None if offline else load_baseline(name, timeout)) for name in BASELINES}
    rows = compression_table(tokenizer, texts, baselines)
    if echo:
        print(
            f"compression (bytes per token, higher is better) of {tok_dir} (vocab {tokenizer.vocab_size:,})"
        )
        print(format_table(rows, BASELINES))
        for name, baseline in baselines.items():
            if baseline is None:
                print(f"{name}: not available offline (tiktoken could not load or download its files)")
    result = {
        "tokenizer": str(tok_dir),
        "vocab_size": tokenizer.vocab_size,
        "baselines": {name: baseline is not None for name, baseline in baselines.items()},
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
