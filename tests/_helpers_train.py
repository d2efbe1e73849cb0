"""Helpers for the training tests: a tokenizer on disk and small real Ray datasets of token rows."""

from __future__ import annotations

import numpy as np

TEXT = (
    "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer the slings and "
    "arrows of outrageous fortune, or to take arms against a sea of troubles. In the beginning God created "
    "the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of "
    "the deep. The quick brown fox jumps over the lazy dog. "
)


def token_rows(tokenizer, seq_len: int, num_rows: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Packed rows {"inputs": int32[T], "targets": int64[T]} cut from a repeated real text stream."""
    ids = tokenizer.encode(TEXT, prepend=tokenizer.get_bos_token_id())
    need = num_rows * (seq_len + 1)
    stream = np.array((ids * (need // len(ids) + 1))[:need], dtype=np.int64).reshape(num_rows, seq_len + 1)
    rng = np.random.default_rng(seed)
    stream = np.roll(stream, rng.integers(0, len(ids)), axis=None).reshape(num_rows, seq_len + 1)
    return [{"inputs": r[:-1].astype(np.int32), "targets": r[1:].astype(np.int64)} for r in stream]


def token_datasets(tokenizer, seq_len: int, train_rows: int, val_rows: int):
    import ray.data

    return {
        "train": ray.data.from_items(token_rows(tokenizer, seq_len, train_rows, seed=1)),
        "val": ray.data.from_items(token_rows(tokenizer, seq_len, val_rows, seed=2)),
    }


def write_text_shards(directory) -> None:
    """Two real parquet shards in nanochat's layout (one `text` column); the last is val."""
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    docs = [TEXT[i % 50:] * 3 for i in range(200)]
    for i, part in enumerate((docs[:160], docs[160:])):
        pq.write_table(pa.table({"text": part}), directory / f"shard_{i:05d}.parquet", compression="zstd")


def tiny_overrides(stage: str = "pretrain", steps: int = 6, **extra) -> list[str]:
    """A 2-layer, 64-wide model on 32-token rows: a few seconds per run on 2 cores."""
    base = [
        "model.depth=2", "model.aspect_ratio=32", "model.head_dim=32", "model.sequence_len=32",
        f"{stage}.device_batch_size=4", f"{stage}.total_batch_size=256", f"{stage}.num_iterations={steps}",
        f"{stage}.eval_every=3", f"{stage}.eval_tokens=256", f"{stage}.sample_every=-1", f"{stage}.save_every=-1",
        f"{stage}.report_every=2", f"{stage}.warmdown_ratio=0.3",
    ]
    return base + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
