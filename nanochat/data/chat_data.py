"""Ray Datasets of rendered conversations for mid-training and SFT.

Both stages yield rows ``{"inputs": int32[T], "targets": int64[T]}`` (targets == -1 are ignored by
the loss), T = ``preset.model.sequence_len``:

* **mid-training** trains on every token (the render mask is ignored). Conversations are
  rendered (truncated to T+1 tokens) and packed best-fit into rows of T+1: each row takes the
  longest remaining conversation that still fits, until none does; the rest is padded with BOS
  whose targets are -1. Nothing is cropped. inputs = row[:-1], targets = row[1:].
* **SFT** puts one conversation per row: inputs = ids[:-1], targets = ids[1:] with -1 wherever the
  render mask is 0 (user turns, assistant_start, tool output), right-padded to T with
  ``assistant_end`` (targets -1). Rows with no supervised token (cut off by truncation) are dropped.

The conversation mixture is built on the driver (cheap: a list of JSON strings); tokenization and
packing run in parallel Ray tasks over fixed blocks of conversations with ordered execution, so
the same preset and tokenizer always give the same rows in the same order.
"""

from __future__ import annotations

import json
from os import PathLike
from typing import Any, Literal

import numpy as np

from nanochat.common import get_logger
from nanochat.config import Preset
from nanochat.data.packing import pack_best_fit_padded
from nanochat.tasks.base import Task
from nanochat.tasks.mixtures import stage_tasks
from nanochat.tokenizer import Tokenizer

log = get_logger(__name__)

CONVERSATIONS_PER_BLOCK = 512
MAP_TASKS = 2  # concurrent render tasks: each new Ray worker pays a ~5 s torch import on small hosts
MAP_NUM_CPUS = 0.25  # leave whole CPUs to the Train workers (ray-on-this-machine pitfall 2)


# ---- pure row builders (no Ray) -------------------------------------------------------------


def sft_row(tokenizer: Tokenizer, conversation: Any, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """One padded SFT row: ``(inputs int32[T], targets int64[T])`` with -1 where mask is 0 or padding."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=seq_len + 1)
    pad = tokenizer.encode_special("<|assistant_end|>")
    inputs = np.full(seq_len, pad, dtype=np.int32)
    targets = np.full(seq_len, -1, dtype=np.int64)
    n = len(ids) - 1
    inputs[:n] = ids[:-1]
    tgt = np.asarray(ids[1:], dtype=np.int64)
    tgt[np.asarray(mask[1:], dtype=bool) == 0] = -1
    targets[:n] = tgt
    return inputs, targets


def mid_rows(tokenizer: Tokenizer, conversations: list[Any], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed mid-training rows for a block of conversations: ``(inputs [N,T], targets [N,T])``."""
    docs = [tokenizer.render_conversation(c, max_tokens=seq_len + 1)[0] for c in conversations]
    bos = tokenizer.get_bos_token_id()
    packed = pack_best_fit_padded(docs, seq_len + 1, bos)
    inputs = np.zeros((len(packed), seq_len), dtype=np.int32)
    targets = np.full((len(packed), seq_len), -1, dtype=np.int64)
    for r, (row, n) in enumerate(packed):
        inputs[r] = row[:-1]
        targets[r, : n - 1] = row[1 : n]
    return inputs, targets


# ---- Ray Data --------------------------------------------------------------------------------


def _render_block(batch: dict[str, np.ndarray], tokenizer: Tokenizer, seq_len: int, stage: str) -> dict:
    conversations = [json.loads(s) for s in batch["conversation"]]
    if stage == "mid":
        inputs, targets = mid_rows(tokenizer, conversations, seq_len)
    else:
        pairs = [sft_row(tokenizer, c, seq_len) for c in conversations]
        pairs = [p for p in pairs if (p[1] >= 0).any()]
        inputs = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, seq_len), np.int32)
        targets = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, seq_len), np.int64)
    return {"inputs": inputs, "targets": targets}


def task_dataset(task: Task, tokenizer: Tokenizer, seq_len: int, stage: Literal["mid", "sft"]):
    """A ray.data.Dataset of training rows rendered from every conversation of ``task``, in order."""
    import ray.data

    items = [{"conversation": json.dumps(task[i], ensure_ascii=False)} for i in range(len(task))]
    if not items:
        raise ValueError(f"{task.name}: no conversations to render")
    blocks = -(-len(items) // CONVERSATIONS_PER_BLOCK)
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds.context.execution_options.preserve_order = True  # this dataset's own context copy, not the global
    return ds.map_batches(
        _render_block,
        batch_size=None,  # one batch = one block: packing never depends on the executor's batching
        batch_format="numpy",
        fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "stage": stage},
        num_cpus=MAP_NUM_CPUS,
        compute=ray.data.TaskPoolStrategy(size=min(MAP_TASKS, blocks)),
    )


def build_chat_datasets(stage: Literal["mid", "sft"], preset: Preset, tokenizer: Tokenizer,
                        base: str | PathLike | None = None):
    """``(train_ds, val_ds)`` for ``stage`` from ``preset.mixture`` at ``preset.model.sequence_len``
    (``base``: the artifacts root caching hub downloads, default ``$NANOCHAT_BASE_DIR``)."""
    train_task, val_task = stage_tasks(stage, preset.mixture, base)
    log.info("%s mixture: %d train / %d val conversations (%s)", stage, len(train_task), len(val_task),
             ", ".join(f"{t.name}={len(t)}" for t in train_task.tasks))
    seq_len = preset.model.sequence_len
    return task_dataset(train_task, tokenizer, seq_len, stage), task_dataset(val_task, tokenizer, seq_len, stage)


def build_midtrain_datasets(preset: Preset, tokenizer: Tokenizer, base: str | PathLike | None = None):
    """Mid-training ``(train_ds, val_ds)``: packed rows, every token supervised (see module doc)."""
    return build_chat_datasets("mid", preset, tokenizer, base)


def build_sft_datasets(preset: Preset, tokenizer: Tokenizer, base: str | PathLike | None = None):
    """SFT ``(train_ds, val_ds)``: one padded conversation per row, targets masked (see module doc)."""
    return build_chat_datasets("sft", preset, tokenizer, base)
