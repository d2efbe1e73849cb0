"""Small shared utilities: where artifacts live, logging, devices, atomic writes.

Nothing here knows about models, Ray or DeepSpeed; every other module may import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


class NanochatError(Exception):
    """An error whose message already tells the user what went wrong and how to fix it.

    The CLI prints these without a traceback and exits with status 2.
    """


def root_cause(err: BaseException) -> str:
    """The last line of the innermost ``__cause__`` of ``err``: what a wrapped worker failure was really about."""
    seen = err
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else type(seen).__name__


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def base_dir(base: str | os.PathLike | None = None) -> Path:
    """Root of every artifact (created if missing): ``base`` when given, else the user's default,
    ``$NANOCHAT_BASE_DIR`` or ``~/.cache/nanochat``.

    The environment is read only here, and only where a caller passes no root: entry points (CLI,
    job scripts, the Serve app's args, the pipeline, Tune) resolve it once and pass it down, and the
    ``base=None`` defaults of public functions resolve it for callers that have none. Nothing writes
    the variable to steer code below (Ray workers get the root in their typed config).
    """
    root = base if base is not None else (
        os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_logger(name: str) -> logging.Logger:
    """A logger that prints concise lines to stderr (configured once per process)."""
    root = logging.getLogger("nanochat")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT, "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("NANOCHAT_LOG_LEVEL", "INFO"))
        root.propagate = False
    return logging.getLogger(name if name.startswith("nanochat") else f"nanochat.{name}")


def autodetect_device() -> torch.device:
    """CUDA if present, else CPU (MPS is not used: several ops we rely on are slow or missing)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs that support it, fp32 elsewhere (inference on CPU: bf16 decoding measured slower)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolved_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype of a resolved training dtype name (``auto-gpu``, ``bfloat16`` or ``float32``)."""
    if name == "auto-gpu":
        return default_compute_dtype(device)
    return torch.bfloat16 if name == "bfloat16" else torch.float32


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it replaces ``final`` atomically.

    A crash inside the block leaves ``final`` untouched (the last good copy survives) and removes
    the temporary directory. An existing ``final`` is moved aside first and deleted only after the
    new one is in place, so there is no moment without a complete copy on disk.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fsync_dir_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
