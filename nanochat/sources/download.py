"""The one HTTP downloader: pretraining shards, hub task files and the CORE eval bundle all use it.

:func:`download` streams a URL into ``<dest>.tmp`` with ``httpx`` (redirects followed, as the
Hugging Face hub's ``resolve`` URLs need) and renames it to ``dest`` only once it is complete and,
when a ``check`` is given, accepted by it: a file under its final name is always whole.

- **Retries**: ``attempts`` tries in all, ``backoff * 2**k`` seconds apart (k = 0, 1, …), on
  connection errors, timeouts, cut connections, HTTP 408/429/5xx and a failed ``check``. Any
  other 4xx (404: wrong URL or mirror) fails at once.
- **Resume**: a ``.tmp`` left by a cut connection or an interrupted run is continued with
  ``Range: bytes=<size>-``. A server that answers 200 instead of 206 restarts the file; a 416 (the
  partial file is not a prefix of the remote one) or a failed ``check`` deletes it first.
- **Progress**: a tqdm bar of bytes per file (``progress=True``, shown only on a terminal), or of
  files for :func:`download_all` (``progress=True``: always shown, as for the shard downloads).

Errors are :class:`DownloadError`, whose message names the URL, what went wrong and the caller's
``hint`` (the fix: which variable points at a mirror, which offline alternative exists).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
from tqdm.auto import tqdm

from nanochat.common import NanochatError, get_logger

log = get_logger(__name__)

HEADERS = {"User-Agent": "nanochat", "Accept-Encoding": "identity"}  # byte ranges of the stored file
RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
DEFAULT_HINT = "check the URL and the network; rerun to resume"


class DownloadError(NanochatError, ConnectionError):
    """A download failed (at once for a 4xx, else after every retry); the message names the URL and the fix."""


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""


def download(
    url: str,
    dest: str | Path,
    *,
    hint: str = DEFAULT_HINT,
    attempts: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    check: Callable[[Path], None] | None = None,
    progress: bool = False,
) -> Path:
    """Download ``url`` to ``dest`` (module doc: retries, resume, atomic rename); returns ``dest``.

    ``check(tmp)`` raises (any exception) when the downloaded bytes are unusable, e.g. not parquet.
    Raises DownloadError.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_into(url, tmp, timeout, progress, hint)
            if check is not None:
                _check(check, tmp)
            os.replace(tmp, dest)
            return dest
        except _Retry as err:
            last = str(err)
        except httpx.TransportError as err:  # refused, timed out, cut mid-body: the .tmp keeps what came
            last = f"{type(err).__name__}: {err}"
        log.warning("download %s failed (attempt %d/%d): %s", url, attempt + 1, attempts, last)
    raise DownloadError(f"download failed: {url} ({last}); {hint}")


def download_all(
    jobs: Sequence[tuple[str, Path]],
    *,
    workers: int = 4,
    desc: str = "files",
    progress: bool = True,
    **options,
) -> int:
    """Download every ``(url, dest)`` whose ``dest`` is missing, ``workers`` at a time.

    ``options`` go to :func:`download`. Returns how many files were downloaded now. Raises
    DownloadError naming every file that failed; the others are complete on disk, so a rerun resumes.
    """
    todo = [(url, Path(dest)) for url, dest in jobs if not Path(dest).exists()]
    if not todo:
        return 0
    failures: list[str] = []
    _client()  # built once here, not by racing threads
    with (
        tqdm(total=len(todo), desc=desc, unit="file", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        futures = [pool.submit(download, url, dest, **options) for url, dest in todo]
        for future in as_completed(futures):
            try:
                future.result()
            except DownloadError as err:
                failures.append(str(err))
            bar.update(1)
    if failures:
        raise DownloadError(f"{len(failures)} of {len(todo)} files failed: " + "; ".join(sorted(failures)[:5]))
    return len(todo)


def fetch_bytes(url: str, *, hint: str = DEFAULT_HINT, attempts: int = 4, backoff: float = 1.0,
                timeout: float = 60.0) -> bytes:
    """GET a small resource (e.g. a JSON listing) into memory, with :func:`download`'s retry rules."""
    last = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            response = _client().get(url, timeout=timeout)
            _raise_for_status(response, url, hint)
            return response.content
        except _Retry as err:
            last = str(err)
        except httpx.TransportError as err:
            last = f"{type(err).__name__}: {err}"
    raise DownloadError(f"download failed: {url} ({last}); {hint}")


@functools.cache
def _client() -> httpx.Client:
    """One client per process: thread-safe, and building one (loading the CA bundle) is slow."""
    return httpx.Client(follow_redirects=True, headers=HEADERS)


def _raise_for_status(response: httpx.Response, url: str, hint: str) -> None:
    if response.status_code < 400:
        return
    reason = f"HTTP {response.status_code} {response.reason_phrase}".strip()
    if response.status_code in RETRY_STATUS:
        raise _Retry(reason)
    raise DownloadError(f"download failed: {url} ({reason}); {hint}")


def _fetch_into(url: str, tmp: Path, timeout: float, progress: bool, hint: str) -> None:
    """One request: append to ``tmp`` from its current size (Range), or (re)write it from the start."""
    offset = tmp.stat().st_size if tmp.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with _client().stream("GET", url, headers=headers, timeout=timeout) as response:
        if response.status_code == 416:
            tmp.unlink(missing_ok=True)
            raise _Retry("HTTP 416: the partial file does not match the remote one; restarting")
        _raise_for_status(response, url, hint)
        if offset and response.status_code == 206 and not _starts_at(response, offset):
            tmp.unlink(missing_ok=True)
            raise _Retry("the server answered another byte range; restarting")
        if offset and response.status_code != 206:
            offset = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        with open(tmp, "ab" if offset else "wb") as f, tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, desc=tmp.name[:-4],
            disable=None if progress else True, leave=False,
        ) as bar:
            for chunk in response.iter_raw():
                f.write(chunk)
                bar.update(len(chunk))
    size = tmp.stat().st_size
    if expected is not None and size != expected:
        raise _Retry(f"incomplete response: {size} of {expected} bytes")


def _starts_at(response: httpx.Response, offset: int) -> bool:
    content_range = response.headers.get("Content-Range")
    return content_range is None or content_range.startswith(f"bytes {offset}-")


def _check(check: Callable[[Path], None], tmp: Path) -> None:
    try:
        check(tmp)
    except Exception as err:  # any complaint of the check means: these bytes are bad
        tmp.unlink(missing_ok=True)
        raise _Retry(f"the downloaded file is not usable ({err}); downloading it again") from err
