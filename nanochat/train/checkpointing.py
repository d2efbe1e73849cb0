"""One training checkpoint as Ray Train stores it, and the training state it carries.

A checkpoint the workers report (Ray copies it to ``<storage>/<run name>/step_N/``) holds:

- ``model/step_N/``: our portable checkpoint (:mod:`nanochat.checkpoint`), written by rank 0; the
  driver exports it to ``checkpoints/<stage>/<tag>/step_N`` (what ``nanochat chat`` loads);
- ``deepspeed/``: DeepSpeed's optimizer state and ZeRO shards, written by every rank
  (``engine.save_checkpoint``, tag :data:`DS_TAG`);
- ``train_state.json``: :class:`TrainState`, where training stands (step, data position, smoothed
  loss, training seconds), written by rank 0.

This module is the one place that knows that layout: the worker loop saves and loads through it,
the driver (:mod:`nanochat.train.resume`, :mod:`nanochat.train.trainer`) reads through it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from nanochat.checkpoint import step_name, step_of

MODEL_DIR = "model"
DEEPSPEED_DIR = "deepspeed"
DS_TAG = "state"
TRAIN_STATE_FILE = "train_state.json"


class TrainState(BaseModel):
    """Where training stands at a checkpoint (``train_state.json``; all zero for a fresh run).

    Rows are dataset rows (one row = one ``sequence_len`` sample); ``rows_in_epoch`` is per worker,
    counted from the start of the epoch; ``ema`` is the smoothed train loss's state
    (:class:`nanochat.train.metrics.EMA`); ``world_size`` is None only for a fresh run;
    ``next_batch``: :func:`batch_digest` of the micro-batch the run trains next (one worker only,
    see :func:`check_first_batch`; None in older checkpoints and where it is not recorded).
    """

    model_config = ConfigDict(extra="ignore")

    step: int = 0
    epoch: int = 0
    rows_in_epoch: int = 0
    rows_consumed_per_worker: int = 0
    rows_consumed: int = 0  # all workers together
    world_size: int | None = None
    zero_stage: int = 0
    ema: dict[str, float] | None = None
    train_seconds: float = 0.0
    next_batch: str | None = None


def model_dir(folder: str | Path, step: int) -> Path:
    """Where rank 0 writes the step's model inside a checkpoint folder."""
    return Path(folder) / MODEL_DIR / step_name(step)


def models_in(folder: str | Path) -> list[Path]:
    """The model checkpoints inside a (local) checkpoint folder, lowest step first."""
    return sorted((Path(folder) / MODEL_DIR).glob("step_*"), key=step_of)


def write_train_state(folder: str | Path, state: TrainState) -> None:
    (Path(folder) / TRAIN_STATE_FILE).write_text(state.model_dump_json())


def read_train_state(folder: str | Path) -> TrainState:
    """The :class:`TrainState` of a local checkpoint folder."""
    return TrainState.model_validate_json((Path(folder) / TRAIN_STATE_FILE).read_text())


def recorded_train_state(checkpoint) -> TrainState:
    """The :class:`TrainState` of a ``ray.train.Checkpoint``, read in place (local or remote storage)."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{TRAIN_STATE_FILE}") as f:
        return TrainState.model_validate(json.loads(f.read()))


def save_engine_state(engine, folder: str | Path) -> None:
    """Every rank: its DeepSpeed optimizer state and ZeRO shards into ``folder/deepspeed``."""
    engine.save_checkpoint(str(Path(folder) / DEEPSPEED_DIR), tag=DS_TAG, save_latest=False)


def load_engine_state(engine, folder: str | Path, state: TrainState, world: int, zero_stage: int) -> None:
    """Every rank: restore the DeepSpeed state of a checkpoint folder (weights and optimizer).

    Raises:
        RuntimeError: the checkpoint's ZeRO shards were written by another number of workers.
    """
    if state.world_size != world and zero_stage > 0:
        raise RuntimeError(
            f"checkpoint has ZeRO shards for {state.world_size} workers, this run has {world}: "
            "resume with the same ray.num_workers, or start fresh with --restart"
        )
    engine.load_checkpoint(str(Path(folder) / DEEPSPEED_DIR), tag=DS_TAG, load_module_strict=True)


def full_model_state(engine, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0, None elsewhere (every rank must call it: ZeRO-3 gathers collectively)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None


def epoch_position(state: TrainState) -> int:
    """Rows a worker had consumed in the checkpoint's epoch: pretraining never leaves epoch 0, where that is
    every row it consumed (``rows_in_epoch`` of older checkpoints counted from where a rebuilt stream began)."""
    return state.rows_consumed_per_worker if state.epoch == 0 else state.rows_in_epoch


def data_position(state: TrainState, dataset_skip_rows: int, world: int) -> tuple[int, int, int]:
    """Where a resumed worker's data starts: ``(epoch, rows to read and drop, rows the shard starts past)``.

    ``state``: the checkpoint's (``TrainState()`` for a fresh run); ``dataset_skip_rows``: global rows
    the driver's dataset already starts past (a pretraining stream rebuilt at the checkpoint's
    position, taken from the same recorded checkpoint). Per worker, the position is
    :func:`epoch_position`.

    An elastic run that resumes with another worker count (``state.world_size != world``) keeps the
    global position: the same number of rows in all, divided among the new workers (exact for a
    pretraining stream rebuilt by the driver; see docs/training.md, "Elastic training").

    Raises:
        RuntimeError: the dataset starts past the checkpoint (the two came from different checkpoints).
    """
    position = epoch_position(state)
    if state.world_size and state.world_size != world:
        position = position * state.world_size // world
    first_row = dataset_skip_rows // world
    if first_row > position:
        raise RuntimeError(
            f"the dataset starts {first_row - position} rows per worker past the checkpoint of step "
            f"{state.step}: the data position and the weights came from different checkpoints; "
            "rerun (or start over with --restart)"
        )
    return state.epoch, position - first_row, first_row


def batch_digest(batch: Mapping[str, torch.Tensor]) -> str:
    """A fingerprint of one micro-batch: sha256 (16 hex digits) over each column's name, shape, dtype and values."""
    h = hashlib.sha256()
    for key in sorted(batch):
        t = batch[key].detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def records_next_batch(world: int) -> bool:
    """Whether a run of ``world`` workers records and checks :attr:`TrainState.next_batch`.

    Only one worker: its shard is the whole ordered stream, so the position fixes the next batch.
    With several, Ray's streaming split hands each block to whichever worker asks first, so which
    rows a worker trains next is not a function of the position (the global row count still is).
    """
    return world == 1


def check_first_batch(state: TrainState, world: int, batch: Mapping[str, torch.Tensor], dataset_skip_rows: int,
                      replayed_rows: int) -> None:
    """A resumed worker's first micro-batch must be the one its checkpoint recorded as next.

    ``dataset_skip_rows``: rows the driver's stream starts past; ``replayed_rows``: rows this worker
    read and dropped before this batch. Checked only where it is sound (:func:`records_next_batch`
    for the checkpoint's and this run's worker counts) and when the checkpoint recorded a digest.

    Raises:
        RuntimeError: the batch is another one: the stream did not start where the checkpoint
            stopped (rows dropped wrongly, or the data or its order changed); names both positions.
    """
    if state.next_batch is None or not (records_next_batch(state.world_size or 0) and records_next_batch(world)):
        return
    got = batch_digest(batch)
    if got != state.next_batch:
        at = epoch_position(state)
        raise RuntimeError(
            f"resumed at the wrong data position: the checkpoint of step {state.step} recorded the micro-batch "
            f"after row {at} of epoch {state.epoch} (digest {state.next_batch}), but this worker's first "
            f"micro-batch, read {dataset_skip_rows} rows into the stream and {replayed_rows} rows replayed, has "
            f"digest {got}: the stream does not continue where the checkpoint stopped (rows dropped wrongly, or "
            "the data or its order changed); rerun, or start over with --restart"
        )
