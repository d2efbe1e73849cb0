"""Helpers for the serving tests and benchmark: a tiny real checkpoint and a running Serve app."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx


def build_tiny_checkpoint(root: Path, tokenizer, model_factory, tag: str = "tiny-serve", seq: int = 512) -> Path:
    """Save a small random GPT with the tiny tokenizer as ``<root>/checkpoints/sft/<tag>/step_000001``."""
    from nanochat.checkpoint import save_checkpoint

    model = model_factory(seed=0, n_layer=2, n_embd=64, n_head=4, n_kv_head=4, seq=seq)
    directory = root / "checkpoints" / "sft" / tag / "step_000001"
    return save_checkpoint(directory, model, model.config, tokenizer, stage="sft", step=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2.0, headers=headers)
            if r.status_code == 200:
                return
            last = r.status_code
        except httpx.HTTPError as err:
            last = err
        time.sleep(0.25)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s (last: {last})")
