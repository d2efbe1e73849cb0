"""Best-fit packing of token lists into fixed-length rows (pure Python/numpy, no Ray).

Two variants, as nanochat packs its two kinds of data:

* :func:`pack_best_fit_cropped` (pretraining, ``data.packing=bestfit``): full rows, no padding;
  when no whole document fits the space left, the shortest one is cropped to fill it.
* :func:`pack_best_fit_padded` (mid-training conversations): whole documents only; the rest of a
  row is padding, which the caller masks out of the loss.

:func:`pack_stream` is nanochat's original pretraining packing (``data.packing=stream``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack_best_fit_cropped(docs: Sequence[Sequence[int]], row_len: int) -> np.ndarray:
    """nanochat's BOS-aligned best-fit packing into full rows ``[N, row_len]``, cropping (pretraining).

    Each row is filled by repeatedly taking the longest remaining document that fits whole (ties:
    the latest document); when none fits, the shortest remaining one is cropped to fill the row (its
    tail is discarded). Every row therefore begins with a document start and holds no padding. A
    last row that cannot be filled is dropped.
    """
    order = sorted(range(len(docs)), key=lambda i: (len(docs[i]), i))
    lengths = [len(docs[i]) for i in order]
    rows: list[np.ndarray] = []
    while order:
        row = np.empty(row_len, dtype=np.int64)
        filled = 0
        while filled < row_len and order:
            room = row_len - filled
            k = bisect.bisect_right(lengths, room) - 1
            if k < 0:
                k = 0  # nothing fits whole: crop the shortest
            doc = docs[order.pop(k)]
            lengths.pop(k)
            take = min(len(doc), room)
            row[filled : filled + take] = doc[:take]
            filled += take
        if filled == row_len:
            rows.append(row)
    return np.stack(rows) if rows else np.empty((0, row_len), dtype=np.int64)


def pack_stream(docs: Sequence[Sequence[int]], row_len: int) -> np.ndarray:
    """nanochat's original packing: concatenate documents, cut windows of ``row_len`` tokens.

    Windows overlap by one token (stride ``row_len - 1``) so every token is a target once; rows
    may start mid-document. The incomplete tail is dropped.
    """
    if not docs:
        return np.empty((0, row_len), dtype=np.int64)
    flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs])
    stride = row_len - 1
    n = (len(flat) - 1) // stride
    if n <= 0:
        return np.empty((0, row_len), dtype=np.int64)
    idx = np.arange(n)[:, None] * stride + np.arange(row_len)[None, :]
    return flat[idx]


def pack_best_fit_padded(docs: list[list[int]], row_len: int, pad_id: int) -> list[tuple[list[int], int]]:
    """Best-fit packing of whole documents, padding each row to ``row_len`` (mid-training).

    Returns ``(row, n_real_tokens)`` pairs. Each row repeatedly takes the longest remaining doc that
    fits the space left (ties: the earliest doc), then is padded with ``pad_id``; nothing is
    cropped or dropped. Raises ValueError for a doc longer than ``row_len`` (truncate first).
    """
    order = sorted(range(len(docs)), key=lambda i: (len(docs[i]), -i))
    lengths = [len(docs[i]) for i in order]
    if lengths and lengths[-1] > row_len:
        raise ValueError(f"a document of {lengths[-1]} tokens does not fit a row of {row_len}")
    rows = []
    while order:
        row: list[int] = []
        while order:
            k = bisect.bisect_right(lengths, row_len - len(row)) - 1
            if k < 0:
                break
            row.extend(docs[order.pop(k)])
            lengths.pop(k)
        n = len(row)
        rows.append((row + [pad_id] * (row_len - n), n))
    return rows
