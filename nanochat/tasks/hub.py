"""Download the reference's task datasets (Hugging Face parquet exports, identity JSONL) with a cache.

Parquet files are listed through the hub's parquet API
``{hub}/api/datasets/<repo>/parquet/<config>/<split>`` (a JSON list of file URLs) and cached under
``$NANOCHAT_BASE_DIR/task_data/<repo>/<config>/<split>/NNNN.parquet``; every file is written
atomically, so an interrupted download is simply retried. ``NANOCHAT_HUB_URL`` overrides the hub
(default https://huggingface.co) and ``NANOCHAT_IDENTITY_URL`` the identity file (tests point both
at a local HTTP server).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from nanochat.common import NanochatError, atomic_write_bytes, base_dir, get_logger

log = get_logger(__name__)

DEFAULT_HUB = "https://huggingface.co"
DEFAULT_IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"

# (repo, config) of the reference datasets.
SMOLTALK = ("HuggingFaceTB/smol-smoltalk", "default")
MMLU = ("cais/mmlu", "all")
GSM8K = ("openai/gsm8k", "main")
ARC_EASY = ("allenai/ai2_arc", "ARC-Easy")
ARC_CHALLENGE = ("allenai/ai2_arc", "ARC-Challenge")


class HubDownloadError(NanochatError, ConnectionError):
    """A hub download failed after retries; the message names the URL."""


def hub_url() -> str:
    return os.environ.get("NANOCHAT_HUB_URL", DEFAULT_HUB).rstrip("/")


def task_data_dir() -> Path:
    return base_dir() / "task_data"


def fetch_bytes(url: str, attempts: int = 4, timeout: float = 60.0) -> bytes:
    """GET ``url`` with exponential backoff (1, 2, 4 s); raises HubDownloadError at the end."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            last = err
            if 400 <= err.code < 500 and err.code != 429:
                break  # not found / forbidden: retrying will not help
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            last = err
        if attempt + 1 < attempts:
            time.sleep(2**attempt)
    raise HubDownloadError(
        f"download failed: {url} ({last}); check the network or set NANOCHAT_HUB_URL / "
        "NANOCHAT_IDENTITY_URL to a mirror, or use mixture.source=builtin for offline data"
    )


def download_parquet_split(repo: str, config: str, split: str) -> list[Path]:
    """Local paths of every parquet file of a dataset split, downloading the missing ones."""
    directory = task_data_dir() / repo.replace("/", "__") / config / split
    manifest = directory / "files.json"
    if manifest.exists():
        names = json.loads(manifest.read_text())
        paths = [directory / n for n in names]
        if all(p.exists() for p in paths):
            return paths
    listing = f"{hub_url()}/api/datasets/{repo}/parquet/{config}/{split}"
    try:
        urls = json.loads(fetch_bytes(listing))
    except json.JSONDecodeError:
        raise HubDownloadError(f"{listing}: expected a JSON list of parquet URLs") from None
    if not isinstance(urls, list) or not urls:
        raise HubDownloadError(f"{listing}: no parquet files for {repo} {config}/{split}")
    paths = []
    for i, url in enumerate(urls):
        path = directory / f"{i:04d}.parquet"
        if not path.exists():
            log.info("downloading %s", url)
            atomic_write_bytes(path, fetch_bytes(url))
        paths.append(path)
    atomic_write_bytes(manifest, json.dumps([p.name for p in paths]).encode())
    return paths


def read_parquet_split(repo: str, config: str, split: str) -> list[dict[str, Any]]:
    """All rows of a hub dataset split as dicts (downloaded once, then read from the cache)."""
    rows: list[dict[str, Any]] = []
    for path in download_parquet_split(repo, config, split):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def download_identity() -> Path:
    """The identity conversations JSONL (bare message arrays, one per line), cached."""
    path = task_data_dir() / "identity_conversations.jsonl"
    if not path.exists():
        url = os.environ.get("NANOCHAT_IDENTITY_URL", DEFAULT_IDENTITY_URL)
        atomic_write_bytes(path, fetch_bytes(url))
    return path
