"""The shared training loop on real local Ray Train + DeepSpeed (tiny model, real datasets of token rows)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from _helpers_train import tiny_overrides, token_datasets

from nanochat.checkpoint import load_checkpoint
from nanochat.train.metrics import read_jsonl
from nanochat.train.trainer import train_stage

ROWS_PER_STEP = 256 // 32  # tiny_overrides: 256 tokens per step, 32-token rows


@pytest.fixture
def tokenizer_on_disk(base_dir, tiny_tokenizer, ray_session):
    tiny_tokenizer.save(base_dir / "tokenizer")
    return tiny_tokenizer


def _pretrain(tok, steps: int, overrides: list[str] = (), workers: int = 1, tag: str = "t", **kwargs):
    return train_stage(
        "pretrain", "tiny", overrides=tiny_overrides(steps=steps) + list(overrides), num_workers=workers,
        datasets=token_datasets(tok, 32, train_rows=600, val_rows=32), tag=tag, **kwargs,
    )


def test_two_workers_zero2_lower_the_loss_and_export_a_loadable_model(tokenizer_on_disk, base_dir):
    result = _pretrain(tokenizer_on_disk, 12, ["pretrain.optimizer=adamw", "pretrain.zero_stage=2",
                                               "pretrain.adamw_lr=0.01", "pretrain.eval_every=6"], workers=2)
    records = read_jsonl(result.metrics_path)
    evals = [r for r in records if "val/bpb" in r]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.3
    last = records[-1]
    for key in ("train/loss", "train/lr_mult", "train/tok_per_sec", "train/mfu", "train/data_wait_frac",
                "tokens_seen", "total_flops"):
        assert key in last
    assert 0 < last["worker/cpu_cores"] <= (os.cpu_count() or 1) + 0.5  # rank 0's process, all its threads
    assert last["step"] == 12 and last["rows_consumed"] == 12 * ROWS_PER_STEP
    ckpt = load_checkpoint(result.checkpoint, expected_stage="base")
    assert ckpt.meta["step"] == 12 and result.checkpoint.endswith("base/t/step_000012")
    summary = json.loads((base_dir / "checkpoints/base/t/summary.json").read_text())
    assert summary["num_iterations"] == 12 and summary["num_params"] == ckpt.model.num_params()


def test_resume_after_a_stop_continues_at_the_same_step_and_data_position(tokenizer_on_disk):
    full = _pretrain(tokenizer_on_disk, 6, tag="full")  # default recipe: Muon + AdamW, ZeRO 0
    stopped = _pretrain(tokenizer_on_disk, 6, tag="resumed", stop_at_step=3)
    assert stopped.metrics["step"] == 3 and stopped.metrics["rows_consumed"] == 3 * ROWS_PER_STEP
    resumed = _pretrain(tokenizer_on_disk, 6, tag="resumed")
    steps = [r["step"] for r in read_jsonl(resumed.metrics_path)]
    assert steps == sorted(steps) and steps[-1] == 6 and steps.count(3) == 1  # step 3 is not re-reported
    assert resumed.metrics["rows_consumed"] == full.metrics["rows_consumed"] == 6 * ROWS_PER_STEP
    # Same weights, optimizer state and batches after the restart => the same training loss.
    assert resumed.metrics["train/raw_loss"] == pytest.approx(full.metrics["train/raw_loss"], abs=1e-4)
    assert resumed.metrics["val/loss"] == pytest.approx(full.metrics["val/loss"], abs=1e-4)
    lines = read_jsonl(resumed.metrics_path)
    again = _pretrain(tokenizer_on_disk, 6, tag="resumed")  # already finished: no training, same model
    assert read_jsonl(again.metrics_path) == lines  # nothing trained or re-reported
    assert again.checkpoint == resumed.checkpoint and again.metrics == resumed.metrics
    assert again.wall_seconds == resumed.wall_seconds > 0  # the summary written when it finished is kept


def test_invalid_batch_fails_before_any_worker_starts(base_dir, tiny_tokenizer):
    from nanochat.train.schedule import BatchSizeError

    with pytest.raises(BatchSizeError, match="total_batch_size=300"):
        train_stage("pretrain", "tiny", overrides=tiny_overrides() + ["pretrain.total_batch_size=300"])


@pytest.mark.slow
def test_zero_stages_give_the_same_losses(tokenizer_on_disk):
    losses = {}
    for stage in (0, 1, 2, 3):
        r = _pretrain(tokenizer_on_disk, 2, ["pretrain.optimizer=adamw", f"pretrain.zero_stage={stage}",
                                             "pretrain.report_every=1"], workers=2, tag=f"z{stage}")
        losses[stage] = [x["train/raw_loss"] for x in read_jsonl(r.metrics_path) if x["step"] in (1, 2)]
    for stage in (1, 2, 3):
        assert losses[stage] == pytest.approx(losses[0], abs=1e-4), losses


@pytest.mark.slow
def test_killed_worker_restarts_from_the_last_checkpoint_and_completes(tokenizer_on_disk, base_dir, tmp_path):
    pid_dir = tmp_path / "pids"
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = _pretrain(tokenizer_on_disk, 80, ["pretrain.save_every=5", "pretrain.report_every=5",
                                                              "pretrain.eval_every=-1", "ray.max_failures=1"],
                                      tag="kill", debug_pid_dir=str(pid_dir))
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    exported = base_dir / "checkpoints/base/kill/step_000005"
    deadline = time.time() + 300
    while not (exported / "meta.json").exists() and time.time() < deadline and thread.is_alive():
        time.sleep(0.2)
    first_pid = int((pid_dir / "rank_0.pid").read_text())
    os.kill(first_pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert int((pid_dir / "rank_0.pid").read_text()) != first_pid  # a new worker process finished the run
    assert result.metrics["step"] == 80 and result.metrics["rows_consumed"] == 80 * ROWS_PER_STEP
    steps = [r["step"] for r in read_jsonl(result.metrics_path)]
    assert steps.count(5) == 1 and steps[-1] == 80  # restored from a checkpoint (>= 5), not from scratch


def _chat_overrides(stage: str, steps: int) -> list[str]:
    small = ["chat=0", "mmlu=0", "arc=0", "gsm8k=0", "identity_epochs=1", "simple_spelling=40", "spelling_bee=20"]
    return tiny_overrides(stage, steps) + [f"mixture.{'mid' if stage == 'midtrain' else 'sft'}.{x}" for x in small] + [
        "mixture.val_max=64", f"{stage}.eval_every=4"]


def test_midtrain_then_sft_on_the_shared_loop_lower_their_losses(tokenizer_on_disk, base_dir, tiny_model_factory):
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint

    model = tiny_model_factory(n_layer=2, n_embd=64, n_head=2, n_kv_head=2, seq=32)
    save_checkpoint(checkpoint_dir("base", "d2", 0), model, model.config, tokenizer_on_disk, stage="base", step=0)
    mid = train_stage("midtrain", "tiny", overrides=_chat_overrides("midtrain", 8) + ["midtrain.adamw_lr=0.01"])
    assert mid.tag == "d2" and mid.checkpoint.endswith("mid/d2/step_000008")
    evals = [r["val/loss"] for r in read_jsonl(mid.metrics_path) if "val/loss" in r]
    assert evals[-1] < evals[0]
    from nanochat.eval.chat_eval import letter_accuracy

    sft = train_stage("sft", "tiny", overrides=_chat_overrides("sft", 16) + ["sft.report_every=1",
                                                                           "sft.init_lr_frac=0.5",
                                                                           "sft.chat_eval_problems=8"],
                      chat_evaluator=letter_accuracy)
    masked = [r["train/raw_loss"] for r in read_jsonl(sft.metrics_path) if r["step"] > 0 and "train/raw_loss" in r]
    # The masked (assistant-only) training loss goes down over the passes (batches differ step to step).
    assert sum(masked[-4:]) < sum(masked[:4]), masked
    assert load_checkpoint(sft.checkpoint, expected_stage="sft").meta["step"] == 16
    # SFT also tracks multiple-choice letter accuracy at its eval steps (categorical, 8 questions each).
    accs = [r for r in read_jsonl(sft.metrics_path) if "val/mmlu_acc" in r]
    assert accs and all(0.0 <= r["val/mmlu_acc"] <= 1.0 and 0.0 <= r["val/arc-easy_acc"] <= 1.0 for r in accs)
