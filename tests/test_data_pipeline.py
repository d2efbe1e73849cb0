"""The Ray Data pretraining pipeline: packing, row contract, determinism, resume, streaming, no starvation."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from nanochat.config import load_preset
from nanochat.data import pipeline
from nanochat.data.packing import pack_best_fit_cropped, pack_stream
from nanochat.data.pipeline import build_pretrain_datasets

BOS = 1000


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[BOS, *rng.integers(0, 999, size=n - 1).tolist()] for n in lengths]


# ---- packing (no Ray) ---------------------------------------------------------------------------


def test_bestfit_rows_are_full_and_start_with_a_document():
    docs = _docs(np.random.default_rng(1).integers(5, 90, size=200))
    rows = pack_best_fit_cropped(docs, 33)
    assert rows.shape[1] == 33 and len(rows) > 50
    assert (rows[:, 0] == BOS).all()
    used = (rows == BOS).sum()
    assert used <= len(docs), "each document is placed at most once"


def test_bestfit_prefers_whole_documents_and_crops_the_shortest():
    docs = [[BOS, 1, 2], [BOS, 3, 4, 5, 6], [BOS, 7], [BOS, 8, 9, 10, 11, 12, 13]]
    rows = pack_best_fit_cropped(docs, 8)
    # row 1: largest fitting whole doc (7 tokens), then the 2-token doc cropped to 1 token
    assert rows[0].tolist() == [BOS, 8, 9, 10, 11, 12, 13, BOS]
    # row 2: the 5-token doc, then the 3-token doc whole: exactly 8
    assert rows[1].tolist() == [BOS, 3, 4, 5, 6, BOS, 1, 2]
    assert len(rows) == 2, "nothing left to fill a third row"


def test_stream_packing_concatenates_and_overlaps_by_one():
    docs = _docs([10, 20, 30, 7])
    flat = np.concatenate(docs)
    rows = pack_stream(docs, 9)
    assert rows.shape == ((len(flat) - 1) // 8, 9)
    assert (rows[1:, 0] == rows[:-1, -1]).all()
    assert rows[0].tolist() == flat[:9].tolist()


def test_rows_to_batch_follows_the_training_contract():
    batch = pipeline.rows_to_batch(np.arange(20).reshape(2, 10))
    assert batch["inputs"].dtype == np.int32 and batch["targets"].dtype == np.int64
    assert batch["inputs"].shape == batch["targets"].shape == (2, 9)
    assert (batch["targets"][:, :-1] == batch["inputs"][:, 1:]).all()


def test_epoch_file_order_is_seeded_and_starts_in_shard_order():
    files = [f"s{i}" for i in range(6)]
    order = pipeline.epoch_file_order(files, 3, seed=42)
    assert order[:6] == files and sorted(order[6:12]) == files and order[6:12] != files
    assert order == pipeline.epoch_file_order(files, 3, seed=42)


def test_repeated_paths_are_made_distinct_without_changing_the_file():
    paths = pipeline.distinct_paths(["/d/a.parquet", "/d/b.parquet", "/d/a.parquet", "/d/a.parquet"])
    assert paths == ["/d/a.parquet", "/d/b.parquet", "/d/./a.parquet", "/d/././a.parquet"]
    assert len({os.path.normpath(p) for p in paths}) == 2


# ---- on Ray ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    """A base dir with the builtin shards and a small tokenizer trained on them."""
    from nanochat.sources.pretrain import iter_train_texts, prepare
    from nanochat.tokenizer import Tokenizer, iter_capped

    base = tmp_path_factory.mktemp("pipeline_base")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        prepare("builtin")
        tok = Tokenizer.train_from_iterator(iter_capped(iter_train_texts("builtin"), 1_500_000, 10_000), 1024)
        tok.save(base / "tokenizer")
        yield {"base": base, "tokenizer": tok}


def _preset(*overrides):
    # two train shards (~1.8K documents) keep each pipeline run to seconds
    return load_preset("tiny", ["data.num_shards=2", "pretrain.eval_tokens=8192", *overrides])


def _rows(ds, n):
    rows = ds.limit(n).take_all()
    return np.stack([r["inputs"] for r in rows]), np.stack([r["targets"] for r in rows])


def test_rows_have_contract_shapes_and_are_bos_aligned(ray_session, data_env):
    train, val = build_pretrain_datasets(_preset(), data_env["base"] / "tokenizer")
    x, y = _rows(train, 64)
    T = 256
    assert x.shape == y.shape == (64, T) and x.dtype == np.int32 and y.dtype == np.int64
    assert (x[:, 0] == data_env["tokenizer"].get_bos_token_id()).all()
    assert (y[:, :-1] == x[:, 1:]).all()
    assert (x < data_env["tokenizer"].vocab_size).all() and (x >= 0).all()
    text = data_env["tokenizer"].decode(x[0].tolist())
    assert text.startswith("<|bos|>") and len(text) > 200
    vx, _ = _rows(val, 10_000)
    assert len(vx) == 8192 // T, "val is capped at eval_tokens / T rows"


def test_same_rows_in_same_order_every_run_and_skip_rows_resumes(ray_session, data_env):
    tok_dir = data_env["base"] / "tokenizer"
    # two independent runs; the second resumes at row 150: equal rows prove both properties
    a, _ = _rows(build_pretrain_datasets(_preset(), tok_dir)[0], 400)
    c, _ = _rows(build_pretrain_datasets(_preset(), tok_dir, skip_rows=150)[0], 250)
    assert len(np.unique(a, axis=0)) > 390, "rows differ from each other"
    assert np.array_equal(c, a[150:400])


@pytest.mark.slow
def test_two_epochs_stream_twice_the_rows_of_one(ray_session, data_env):
    # Ray Data reads a repeated path once; without distinct paths every num_epochs gave one pass.
    tok_dir = data_env["base"] / "tokenizer"
    one = build_pretrain_datasets(_preset(), tok_dir, num_epochs=1)[0].materialize().count()
    two = build_pretrain_datasets(_preset(), tok_dir, num_epochs=2)[0].materialize().count()
    assert one > 100 and abs(two - 2 * one) <= 2, (one, two)


@pytest.mark.slow
def test_stream_packing_option_cuts_windows(ray_session, data_env):
    train, _ = build_pretrain_datasets(_preset("data.packing=stream"), data_env["base"] / "tokenizer")
    x, y = _rows(train, 100)
    assert x.shape == (100, 256)
    assert (y[:-1, -1] == x[1:, 0]).mean() > 0.9, "consecutive windows of one token stream"
    assert (x[:, 0] != data_env["tokenizer"].get_bos_token_id()).any(), "rows may start mid-document"


def test_first_batch_arrives_long_before_the_stream_is_read(ray_session, data_env, tmp_path):
    """Structural streaming check through Train's split: count tokenized batches at first delivery."""
    trace = tmp_path / "trace"
    trace.mkdir()
    train, _ = build_pretrain_datasets(_preset(), data_env["base"] / "tokenizer", num_epochs=6, trace_dir=str(trace))
    (split,) = train.streaming_split(1, equal=True)
    batches = iter(split.iter_torch_batches(batch_size=16, drop_last=True))  # one pass, read to the end
    next(batches)
    at_first = len(os.listdir(trace))
    total_batches = 1 + sum(1 for _ in batches)
    total = len(os.listdir(trace))
    assert total_batches > 100
    assert at_first <= total / 4, f"{at_first} of {total} document batches were tokenized before the first row"


@pytest.mark.timeout(300)
def test_pipeline_feeds_two_consumers_while_workers_hold_whole_cpus(ray_session, data_env):
    """Two Train-like consumers, each beside an actor holding a whole CPU: the data must still flow."""
    import ray

    @ray.remote(num_cpus=1)
    class Holder:  # stands in for a Train worker that owns its CPU for the whole run
        def ready(self):
            return True

    holders = [Holder.remote() for _ in range(2)]
    ray.get([h.ready.remote() for h in holders])
    try:
        train, _ = build_pretrain_datasets(_preset(), data_env["base"] / "tokenizer")
        splits = train.streaming_split(2, equal=True)
        got = [0, 0]

        def consume(i):
            for n, batch in enumerate(splits[i].iter_torch_batches(batch_size=8, drop_last=True)):
                assert batch["inputs"].shape == (8, 256)
                got[i] += 1
                if n == 9:
                    break

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert got == [10, 10]
    finally:
        for h in holders:
            ray.kill(h)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_trainer_workers_consume_their_shards(ray_session, data_env):
    """Real Ray Train: 2 workers, datasets passed with ``datasets=``, read with get_dataset_shard."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        it = ray.train.get_dataset_shard("train")
        seen = 0
        for n, batch in enumerate(it.iter_torch_batches(batch_size=4, drop_last=True)):
            assert batch["inputs"].shape == (4, 256) and str(batch["targets"].dtype) == "torch.int64"
            seen += 1
            if n == 4:
                break
        val_rows = sum(len(b["inputs"]) for b in ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=4))
        ray.train.report({"train_batches": seen, "val_rows": val_rows})

    train, val = build_pretrain_datasets(_preset(), data_env["base"] / "tokenizer")
    trainer = TorchTrainer(
        loop,
        datasets={"train": train, "val": val},
        dataset_config=pipeline.pretrain_data_config(),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(data_env["base"] / "ray_results"), name="data_consume"),
    )
    result = trainer.fit()
    assert result.error is None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ingest_buffer_keeps_the_tokenizer_from_running_far_ahead_of_training(ray_session, data_env, tmp_path):
    """Backpressure: on an endless stream the tokenize actor stops once the trainer's buffer is full.

    Without the cap (Ray Data's default budget) this consumer pattern tokenized ~80 document batches
    while training used ~15; with the 16 MiB floor, ~15."""
    import json

    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trace = tmp_path / "trace"
    trace.mkdir()
    report = tmp_path / "report.json"

    def loop(config):
        import time

        it = ray.train.get_dataset_shard("train")
        rows = 0
        for n, batch in enumerate(it.iter_torch_batches(batch_size=8, drop_last=True), start=1):
            rows += len(batch["inputs"])
            time.sleep(0.02)  # a (fast) training step
            if n == 100:
                break
        time.sleep(3)  # an unbounded pipeline keeps tokenizing meanwhile
        with open(config["report"], "w") as f:
            json.dump({"rows": rows, "tokenized": len(os.listdir(config["trace"]))}, f)

    train, val = build_pretrain_datasets(_preset(), data_env["base"] / "tokenizer", num_epochs=-1, trace_dir=str(trace))
    buffer = pipeline.ingest_buffer_bytes(world=1, device_batch_size=8, seq_len=256)
    trainer = TorchTrainer(
        loop,
        train_loop_config={"trace": str(trace), "report": str(report)},
        datasets={"train": train, "val": val},
        dataset_config=pipeline.pretrain_data_config(["train"], buffer_bytes=buffer),
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(data_env["base"] / "ray_results"), name="ingest_buffer"),
    )
    assert trainer.fit().error is None
    got = json.loads(report.read_text())
    # one document batch (256 documents) packs into >= 50 rows of 257 tokens: 800 rows need <= 16 of them
    assert got["rows"] == 800
    assert got["tokenized"] <= 32, f"{got['tokenized']} document batches tokenized for 800 rows: no backpressure"


def test_ingest_buffer_scales_with_workers_and_batch_and_honours_the_setting():
    assert pipeline.ingest_buffer_bytes(1, 8, 256) == 16 * 2**20  # the floor
    assert pipeline.ingest_buffer_bytes(8, 32, 2048) == 32 * 8 * 32 * 2048 * 12
    assert pipeline.ingest_buffer_bytes(1, 8, 256, buffer_mb=4) == 4 * 2**20


def test_idle_backoff_sleeps_only_after_steps_that_did_not_wait():
    import time

    from nanochat.data.idle_backoff import IDLE_STEP_S, IdleBackoff

    cb = IdleBackoff()
    cb.on_execution_step(None)  # first step: nothing to compare with
    assert cb.sleeps == 0
    time.sleep(IDLE_STEP_S * 2)  # a step that blocked (ray.wait) for a while
    cb.on_execution_step(None)
    assert cb.sleeps == 0
    cb.on_execution_step(None)  # back to back: the loop is spinning
    assert cb.sleeps == 1


def test_idle_backoff_installs_on_the_dataset_not_the_global_context(ray_session, data_env):
    from ray.data import DataContext

    from nanochat.data import idle_backoff

    train, val = build_pretrain_datasets(_preset(), data_env["base"] / "tokenizer")
    idle_backoff.install(train)
    assert idle_backoff.IdleBackoff in train.context.custom_execution_callback_classes
    assert idle_backoff.IdleBackoff not in val.context.custom_execution_callback_classes
    assert idle_backoff.IdleBackoff not in DataContext.get_current().custom_execution_callback_classes


def test_endless_stream_lists_about_two_thousand_paths():
    assert pipeline.endless_epochs(9) == 223
    assert pipeline.endless_epochs(1) == 500
    assert pipeline.endless_epochs(1800) == 2
