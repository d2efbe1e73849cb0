"""Download the reference's task datasets (Hugging Face parquet exports, identity JSONL) with a cache.

Parquet files are listed through the hub's parquet API
``{hub}/api/datasets/<repo>/parquet/<config>/<split>`` (a JSON list of file URLs) and cached under
``<base>/task_data/<repo>/<config>/<split>/NNNN.parquet`` (``base``: the artifacts root every function
here takes, default ``$NANOCHAT_BASE_DIR``) by
:func:`nanochat.sources.download.download` (retried, resumable, renamed into place only when
complete), so an interrupted download is simply rerun. ``NANOCHAT_HUB_URL`` overrides the hub
(default https://huggingface.co) and ``NANOCHAT_IDENTITY_URL`` the identity file (tests point both
at a local HTTP server).
"""

from __future__ import annotations

import json
import os
from os import PathLike
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from nanochat.common import atomic_write_bytes, base_dir, get_logger
from nanochat.sources.download import DownloadError, download, fetch_bytes

log = get_logger(__name__)

DEFAULT_HUB = "https://huggingface.co"
DEFAULT_IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
HINT = ("check the network or set NANOCHAT_HUB_URL / NANOCHAT_IDENTITY_URL to a mirror, "
        "or use mixture.source=builtin for offline data")

# (repo, config) of the reference datasets.
SMOLTALK = ("HuggingFaceTB/smol-smoltalk", "default")
MMLU = ("cais/mmlu", "all")
GSM8K = ("openai/gsm8k", "main")
ARC_EASY = ("allenai/ai2_arc", "ARC-Easy")
ARC_CHALLENGE = ("allenai/ai2_arc", "ARC-Challenge")


class HubDownloadError(DownloadError):
    """A hub download failed (at once for a 4xx, else after retries); the message names the URL and the fix."""


def hub_url() -> str:
    return os.environ.get("NANOCHAT_HUB_URL", DEFAULT_HUB).rstrip("/")


def task_data_dir(base: str | PathLike | None = None) -> Path:
    return base_dir(base) / "task_data"


def _download(url: str, dest: Path) -> Path:
    try:
        return download(url, dest, hint=HINT, attempts=4, backoff=1.0, progress=True)
    except DownloadError as err:
        raise HubDownloadError(str(err)) from None


def download_parquet_split(repo: str, config: str, split: str, base: str | PathLike | None = None) -> list[Path]:
    """Local paths of every parquet file of a dataset split, downloading the missing ones."""
    directory = task_data_dir(base) / repo.replace("/", "__") / config / split
    manifest = directory / "files.json"
    if manifest.exists():
        names = json.loads(manifest.read_text())
        paths = [directory / n for n in names]
        if all(p.exists() for p in paths):
            return paths
    listing = f"{hub_url()}/api/datasets/{repo}/parquet/{config}/{split}"
    try:
        urls = json.loads(fetch_bytes(listing, hint=HINT))
    except DownloadError as err:
        raise HubDownloadError(str(err)) from None
    except json.JSONDecodeError:
        raise HubDownloadError(f"{listing}: expected a JSON list of parquet URLs") from None
    if not isinstance(urls, list) or not urls:
        raise HubDownloadError(f"{listing}: no parquet files for {repo} {config}/{split}")
    paths = []
    for i, url in enumerate(urls):
        path = directory / f"{i:04d}.parquet"
        if not path.exists():
            log.info("downloading %s", url)
            _download(url, path)
        paths.append(path)
    atomic_write_bytes(manifest, json.dumps([p.name for p in paths]).encode())
    return paths


def read_parquet_split(repo: str, config: str, split: str, base: str | PathLike | None = None) -> list[dict[str, Any]]:
    """All rows of a hub dataset split as dicts (downloaded once, then read from the cache)."""
    rows: list[dict[str, Any]] = []
    for path in download_parquet_split(repo, config, split, base):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def download_identity(base: str | PathLike | None = None) -> Path:
    """The identity conversations JSONL (bare message arrays, one per line), cached."""
    path = task_data_dir(base) / "identity_conversations.jsonl"
    if not path.exists():
        _download(os.environ.get("NANOCHAT_IDENTITY_URL", DEFAULT_IDENTITY_URL), path)
    return path
