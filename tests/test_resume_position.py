"""A resumed run's data position: the next-batch fingerprint, the in-order SkipRows stage, the wait for a stopped run.

Issue 14's fault: a resubmitted pipeline job loaded step 4's checkpoint and asked Ray Data to skip the 16
rows it had consumed, yet trained rows 0-3 again. The cause: Ray Data 2.60 runs a map actor's tasks out of
order by default, so the single ``SkipRows`` actor could drop the rows of block 1 and pass block 0 whole
(forced below at the level of Ray's actor calls, with Ray Data's default options and with ours). The
checkpoint now also records a digest of the micro-batch trained next, which a resumed worker checks.
"""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest
import torch

from nanochat import ray_stop
from nanochat.data import pipeline
from nanochat.train.checkpointing import TrainState, batch_digest, check_first_batch
from nanochat.train.loop import TrainData


def _batch(first: int, rows: int = 2, cols: int = 3) -> dict[str, torch.Tensor]:
    x = torch.arange(first * cols, (first + rows) * cols, dtype=torch.int32).reshape(rows, cols)
    return {"inputs": x, "targets": x.long() + 1}


class _Shard:
    """``iter_torch_batches`` over a fixed list of rows, re-run from the start each call (like a Ray shard)."""

    def __init__(self, num_rows: int):
        self.num_rows, self.passes = num_rows, 0

    def iter_torch_batches(self, batch_size: int, drop_last: bool, prefetch_batches: int):
        self.passes += 1
        return iter([_batch(r, batch_size) for r in range(0, self.num_rows - batch_size + 1, batch_size)])


# ---- the fingerprint -------------------------------------------------------------------------------------


def test_the_digest_tells_batches_apart_by_values_shape_and_dtype():
    a = _batch(0)
    assert batch_digest(a) == batch_digest({k: v.clone() for k, v in a.items()})
    assert batch_digest(a) != batch_digest(_batch(2))
    assert batch_digest(a) != batch_digest({**a, "inputs": a["inputs"].long()})
    assert batch_digest(a) != batch_digest({k: v.reshape(1, -1) for k, v in a.items()})


def test_a_resumed_worker_whose_first_batch_is_another_one_fails_naming_both_positions():
    state = TrainState(step=4, rows_consumed_per_worker=16, rows_consumed=16, world_size=1,
                       next_batch=batch_digest(_batch(16)))
    check_first_batch(state, 1, _batch(16), dataset_skip_rows=16, replayed_rows=0)  # the right batch passes
    with pytest.raises(RuntimeError) as err:
        check_first_batch(state, 1, _batch(0), dataset_skip_rows=16, replayed_rows=0)  # the fault: row 0 again
    msg = str(err.value)
    assert "step 4" in msg and "after row 16 of epoch 0" in msg and "16 rows into the stream" in msg, msg
    assert state.next_batch in msg and batch_digest(_batch(0)) in msg and "--restart" in msg, msg


def test_checkpoints_without_a_digest_and_runs_of_several_workers_are_not_checked():
    older = TrainState.model_validate_json('{"step": 4, "rows_consumed_per_worker": 16, "world_size": 1}')
    assert older.next_batch is None
    check_first_batch(older, 1, _batch(0), dataset_skip_rows=16, replayed_rows=0)
    # Ray's streaming split gives a worker whichever block it asks for first: no fixed next batch there.
    digest = batch_digest(_batch(16))
    check_first_batch(TrainState(step=4, world_size=2, next_batch=digest), 2, _batch(0), 16, 0)
    check_first_batch(TrainState(step=4, world_size=1, next_batch=digest), 2, _batch(0), 16, 0)  # grown to 2


# ---- TrainData: the peeked batch is kept, the first batch is checked ---------------------------------------


def test_a_peeked_batch_is_the_next_one_trained_and_nothing_is_counted_twice():
    data = TrainData(_Shard(8), 2, torch.device("cpu"))
    x0, _ = data.next()
    peeked = data.peek()
    assert data.peek() is peeked and (data.rows_in_epoch, data.rows_consumed) == (2, 2)
    x1, _ = data.next()
    assert torch.equal(x1, peeked["inputs"].long()) and torch.equal(x1, _batch(2)["inputs"].long())
    assert (data.rows_in_epoch, data.rows_consumed) == (4, 4)
    assert not torch.equal(x0, x1)


def test_a_peek_across_the_end_of_an_epoch_moves_the_epoch_only_when_that_batch_is_trained():
    shard = _Shard(4)
    data = TrainData(shard, 2, torch.device("cpu"))
    data.next(), data.next()
    peeked = data.peek()  # the first batch of epoch 1
    assert (data.epoch, data.rows_in_epoch) == (0, 4) and shard.passes == 2  # what a checkpoint now records
    x, _ = data.next()
    assert torch.equal(x, peeked["inputs"].long()) and (data.epoch, data.rows_in_epoch, data.rows_consumed) == (1, 2, 6)


def test_the_first_batch_after_a_replay_is_handed_to_the_check_once():
    seen = []
    data = TrainData(_Shard(10), 2, torch.device("cpu"), skip_rows=4, check_first=seen.append)
    data.next(), data.next()
    assert len(seen) == 1 and torch.equal(seen[0]["inputs"], _batch(4)["inputs"])


def test_an_empty_dataset_still_fails_clearly():
    with pytest.raises(RuntimeError, match="no full batch"):
        TrainData(_Shard(1), 2, torch.device("cpu")).next()


# ---- SkipRows: the stage that dropped the wrong rows -----------------------------------------------------


def _rows(first: int, n: int) -> dict[str, np.ndarray]:
    return {"inputs": np.arange(first, first + n).reshape(n, 1)}


def _as_task(skip: pipeline.SkipRows, task_idx: int, batch):
    from ray.data._internal.execution.interfaces.task_context import TaskContext

    with TaskContext.current(TaskContext(task_idx=task_idx, op_name="MapBatches(SkipRows)")):
        return skip(batch)


def test_skip_rows_drops_the_first_rows_of_blocks_in_order():
    skip = pipeline.SkipRows(5)
    assert _as_task(skip, 0, _rows(0, 3))["inputs"].size == 0
    assert _as_task(skip, 1, _rows(3, 4))["inputs"].ravel().tolist() == [5, 6]
    assert _as_task(skip, 2, _rows(7, 2))["inputs"].ravel().tolist() == [7, 8]
    assert skip(_rows(9, 1))["inputs"].ravel().tolist() == [9]  # outside Ray Data: no task index to check


def test_skip_rows_refuses_a_block_that_arrives_after_rows_of_a_later_block_were_dropped():
    """The fault as it happened: block 1 ran first and lost the rows; block 0 would then pass whole."""
    skip = pipeline.SkipRows(16)
    assert _as_task(skip, 1, _rows(20, 20))["inputs"].ravel().tolist() == list(range(36, 40))
    with pytest.raises(RuntimeError, match="got block 0 of the stream after dropping rows of block 1"):
        _as_task(skip, 0, _rows(0, 20))


def test_the_skip_rows_stage_runs_in_order_on_one_actor_seeing_each_blocks_index(ray_session):
    """On Ray Data: exactly the first rows dropped, blocks met in stream order, and the block index that
    SkipRows checks is visible to it (its UDF runs in the task's thread); one task in flight, no restart."""
    ray = ray_session

    class Traced(pipeline.SkipRows):  # the block index each row passed SkipRows under
        def __call__(self, batch):
            out = super().__call__(batch)
            return {**out, "block": np.full(len(out["inputs"]), -1 if (i := pipeline._task_index()) is None else i)}

    with pipeline._small_blocks():  # preserve_order, as the pretraining stream is built
        ds = ray.data.range(40, override_num_blocks=8).map_batches(lambda b: {"inputs": b["id"]}, batch_size=None)
        ds = pipeline.skip_first_rows(ds, 7, udf=Traced)
    rows = ds.take_all()
    assert [r["inputs"] for r in rows] == list(range(7, 40))
    blocks = [r["block"] for r in rows]
    assert blocks == sorted(blocks) and blocks[0] >= 1 and min(blocks) >= 0, blocks  # block 0 (rows 0-4) emptied
    stage = ds._logical_plan.dag
    assert stage.compute.min_size == stage.compute.max_size == 1
    assert stage.compute.max_tasks_in_flight_per_actor == pipeline.SKIP_ROWS_TASKS_IN_FLIGHT == 1
    assert {k: stage.ray_remote_args[k] for k in pipeline.SKIP_ROWS_OPTIONS} == pipeline.SKIP_ROWS_OPTIONS


@pytest.mark.parametrize("options, expected", [
    ({"allow_out_of_order_execution": True, "max_restarts": -1, "max_task_retries": -1}, [1, 0]),  # Ray Data's
    (pipeline.SKIP_ROWS_OPTIONS, [0, 1]),  # ours
], ids=["ray-data-default-runs-out-of-order", "skip-rows-options-run-in-order"])
def test_an_actor_call_whose_input_is_still_in_flight_is_overtaken_only_under_ray_datas_defaults(
        ray_session, options, expected):
    """The fault forced: call 0's input (a block) is not yet at the actor, call 1's is. Ray Data's map actors
    run the ready call first, so a stateful SkipRows drops block 1's rows; with our options, block 0 first."""
    ray = ray_session

    class Calls:  # defined here: Ray pickles it by value (the test module is not importable in workers)
        def __init__(self):
            self.seen: list[int] = []

        def record(self, x: int) -> int:
            self.seen.append(x)
            return x

        def order(self) -> list[int]:
            return self.seen

    def slow(x: int) -> int:
        time.sleep(1.0)
        return x

    actor = ray.remote(Calls).options(num_cpus=0, **options).remote()
    ray.get(actor.order.remote())  # started
    ray.get([actor.record.remote(ray.remote(slow).options(num_cpus=0).remote(0)), actor.record.remote(1)])
    assert ray.get(actor.order.remote()) == expected


# ---- a stopped run winding down; SIGTERM does what Ctrl-C does ---------------------------------------------


def test_a_new_run_waits_while_an_earlier_run_of_its_name_is_alive_and_is_bounded(monkeypatch, caplog):
    answers = iter([["controller"], ["controller", "worker"], []])
    monkeypatch.setattr(ray_stop, "_live_train_actors", lambda name: next(answers))
    assert ray_stop.wait_for_earlier_run("base-d4", timeout_s=30, poll_s=0.01) is True
    assert "earlier Train run 'base-d4' is still running" in caplog.text and "ended after" in caplog.text
    monkeypatch.setattr(ray_stop, "_live_train_actors", lambda name: ["controller"])
    assert ray_stop.wait_for_earlier_run("base-d4", timeout_s=0.05, poll_s=0.01) is False
    assert "starting anyway" in caplog.text
    monkeypatch.setattr(ray_stop, "_live_train_actors", lambda name: [])
    assert ray_stop.wait_for_earlier_run("base-d4", timeout_s=0.05) is True


def test_sigterm_runs_a_graceful_ctrl_c_handler_first_then_interrupts():
    calls = []

    def train_style(signum, frame):  # Ray Train's: abort the run, then sys.exit(0)
        calls.append(signum)
        raise SystemExit(0)

    previous = signal.signal(signal.SIGINT, train_style)
    try:
        with pytest.raises(KeyboardInterrupt):
            ray_stop.raise_interrupt(signal.SIGTERM, None)
        assert calls == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(KeyboardInterrupt):  # Python's default Ctrl-C handler: just the interrupt
            ray_stop.raise_interrupt(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls == [signal.SIGINT]
