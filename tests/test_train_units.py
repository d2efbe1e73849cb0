"""Unit tests of the training loop's parts: schedule, batch arithmetic, optimizer recipe, bpb, validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanochat.config import ConfigError, TrainSettings, load_preset
from nanochat.losses import bits_per_byte, loss_nats_and_bytes
from nanochat.train.metrics import EMA, Throughput
from nanochat.train.optim import MuonAdamW, dmodel_lr_scale, muon_adamw_groups, orthogonalize
from nanochat.train.schedule import (
    BatchSizeError,
    epoch_iterations,
    grad_accum_steps,
    is_due,
    lr_multiplier,
    pretrain_iterations,
)


def test_pretrain_schedule_warms_up_holds_then_decays_to_final_frac():
    lrs = [lr_multiplier(s, 100, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.05) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x == 1.0 for x in lrs[10:81])
    assert lrs[90] == pytest.approx(0.5 + 0.5 * 0.05)
    assert lrs[100] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_midtrain_schedule_is_flat_until_80_percent_then_linear_to_zero():
    lrs = [lr_multiplier(s, 50, 0.0, 0.2, 0.0) for s in range(51)]
    assert all(x == 1.0 for x in lrs[:41])
    assert lrs[45] == pytest.approx(0.5) and lrs[50] == 0.0


def test_sft_schedule_decays_linearly_from_the_start():
    lrs = [lr_multiplier(s, 10, 0.0, 1.0, 0.0) for s in range(11)]
    assert lrs == pytest.approx([1 - s / 10 for s in range(11)])


def test_grad_accum_divides_total_batch_or_explains_the_fix():
    assert grad_accum_steps(8192, 16, 256, 1) == 2
    assert grad_accum_steps(8192, 8, 256, 2) == 2
    with pytest.raises(BatchSizeError, match=r"not divisible by device_batch_size x sequence_len x num_workers.*4096"):
        grad_accum_steps(6000, 16, 256, 1)


def test_horizons_from_ratio_and_epochs():
    assert pretrain_iterations(7, 20, 10**6, 1000) == 7
    assert pretrain_iterations(-1, 20, 10**6, 1000) == 20_000
    assert epoch_iterations(-1, 2.0, 1000, 32) == 62
    assert is_due(10, 5, 20) and is_due(20, -1, 20) and not is_due(0, 5, 20)


def test_an_unknown_zero_stage_is_refused_with_the_allowed_values():
    # muon_adamw with ZeRO 1-3 is accepted: tests/test_muon_zero.py
    assert load_preset("tiny", ["pretrain.zero_stage=3", "pretrain.optimizer=adamw"]).pretrain.zero_stage == 3
    with pytest.raises(ConfigError, match="zero_stage"):
        load_preset("tiny", ["pretrain.zero_stage=4"])


def test_muon_adamw_groups_scale_adamw_lrs_by_width(tiny_model_factory):
    model = tiny_model_factory(n_embd=64)
    settings = TrainSettings(embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, init_lr_frac=0.5)
    groups = {g["name"]: g for g in muon_adamw_groups(model, settings)}
    s = dmodel_lr_scale(64)
    assert s == pytest.approx((64 / 768) ** -0.5)
    assert groups["embedding"]["lr"] == pytest.approx(0.2 * s * 0.5)
    assert groups["lm_head"]["lr"] == pytest.approx(0.004 * s * 0.5)
    assert groups["matrices"]["lr"] == pytest.approx(0.01) and groups["matrices"]["kind"] == "muon"


def test_orthogonalize_pushes_singular_values_towards_one():
    g = torch.randn(64, 32) @ torch.diag(torch.logspace(-1, 0.5, 32))  # singular values spread ~50x
    sv = torch.linalg.svdvals(orthogonalize(g).float())
    assert sv.max() / sv.min() < 2 and 0.5 < sv.min() and sv.max() < 1.3


def test_muon_adamw_step_lowers_a_regression_loss():
    torch.manual_seed(0)
    w, emb = torch.nn.Parameter(torch.randn(16, 16) * 0.1), torch.nn.Parameter(torch.randn(8, 16))
    target = torch.randn(16, 16)
    opt = MuonAdamW([{"params": [w], "kind": "muon", "lr": 0.2}, {"params": [emb], "lr": 0.05}])
    losses = []
    for _ in range(30):
        loss = ((w - target) ** 2).mean() + (emb**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_steps_same_shape_matrices_together_as_it_would_one_at_a_time(dtype):
    """MuonAdamW stacks the matrices of one shape into one batched Newton-Schulz: each matrix must take
    the step it takes alone (bf16 too: tall matrices are transposed into contiguous copies for that)."""
    torch.manual_seed(0)
    shapes = [(1024, 256)] * 7 + [(256, 256), (256, 1024)]  # 7 tall: where the layout mattered (bf16)
    data = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]

    def run(groups_of: list[list[int]]) -> tuple[list[torch.Tensor], list[int]]:
        params = [torch.nn.Parameter(d.clone()) for d in data]
        opts = [MuonAdamW([{"params": [params[i] for i in ids], "kind": "muon", "lr": 0.1}], ns_dtype=dtype)
                for ids in groups_of]
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            for opt in opts:
                opt.step()
        return [p.detach() for p in params], [c for opt in opts for c in opt.ns_counts]

    together, counts = run([list(range(len(shapes)))])
    alone, _ = run([[i] for i in range(len(shapes))])
    assert counts == [3] * len(shapes)  # every matrix counted at every step, stacked or not
    for a, b, d in zip(together, alone, data):
        assert torch.equal(a, b) and not torch.equal(a, d)


def test_bits_per_byte_skips_special_and_ignored_targets():
    token_bytes = torch.tensor([1, 2, 3, 0])  # id 3 is special
    per_token = torch.tensor([1.0, 1.0, 5.0, 7.0])
    targets = torch.tensor([0, 2, 3, -1])
    nats, nbytes = loss_nats_and_bytes(per_token, targets, token_bytes)
    assert nats.item() == pytest.approx(2.0) and nbytes.item() == 4
    assert bits_per_byte(2.0, 4) == pytest.approx(2.0 / (math.log(2) * 4))
    assert bits_per_byte(1.0, 0) == float("inf")


def test_ema_is_debiased():
    ema = EMA(0.9)
    assert ema.update(3.0) == pytest.approx(3.0)
    ema.update(3.0)
    assert ema.get() == pytest.approx(3.0)


def test_throughput_window_reads_the_cpu_the_process_used_not_the_wall_time():
    import time

    meter = Throughput()
    time.sleep(0.3)
    idle = meter.window()["cpu_cores"]
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # one thread busy
        pass
    busy = meter.window()["cpu_cores"]
    assert idle < 0.1 and busy > max(0.2, 3 * idle)


def test_greedy_samples_continue_each_prompt(tiny_model_factory, tiny_tokenizer):
    from nanochat.train.loop import greedy_samples

    out = greedy_samples(tiny_model_factory(), tiny_tokenizer, ["The quick", "To be"], torch.device("cpu"), 4)
    assert len(out) == 2 and out[0].startswith("The quick") and out[1].startswith("To be")


def _save_ckpt(base_dir, model, tokenizer, stage: str, tag: str = "d2"):
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint

    return save_checkpoint(checkpoint_dir(stage, tag, 5), model, model.config, tokenizer, stage=stage, step=5)


def test_midtrain_refuses_a_checkpoint_of_the_wrong_stage(base_dir, tiny_model_factory, tiny_tokenizer):
    from nanochat.checkpoint import CheckpointError
    from nanochat.train.trainer import train_stage

    path = _save_ckpt(base_dir, tiny_model_factory(), tiny_tokenizer, "sft")
    with pytest.raises(CheckpointError, match="is a 'sft' checkpoint, but midtrain starts from a 'base' one"):
        train_stage("midtrain", "tiny", from_checkpoint=str(path))
    with pytest.raises(CheckpointError, match="no base checkpoint"):
        train_stage("midtrain", "tiny")  # default source: the latest base checkpoint (none here)


def test_sft_refuses_a_checkpoint_trained_with_another_tokenizer(base_dir, tiny_model_factory, tiny_tokenizer):
    from _helpers_train import TEXT

    from nanochat.checkpoint import CheckpointError
    from nanochat.tokenizer import Tokenizer
    from nanochat.train.trainer import train_stage

    _save_ckpt(base_dir, tiny_model_factory(), tiny_tokenizer, "mid")
    Tokenizer.train_from_iterator([TEXT] * 5, vocab_size=300).save(base_dir / "tokenizer")
    with pytest.raises(CheckpointError, match="trained with tokenizer .* but .* holds tokenizer"):
        train_stage("sft", "tiny")


def test_resolved_dtype_names_map_to_torch_dtypes():
    import torch

    from nanochat.common import resolved_dtype

    assert resolved_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolved_dtype("float32", "cpu") == torch.float32
    assert resolved_dtype("auto-gpu", "cpu") == torch.float32  # no GPU: the worker falls back to fp32


def test_keep_checkpoints_defaults_to_two_and_must_keep_one():
    assert load_preset("tiny").pretrain.keep_checkpoints == 2
    assert load_preset("tiny", ["sft.keep_checkpoints=5"]).sft.keep_checkpoints == 5
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        load_preset("tiny", ["pretrain.keep_checkpoints=0"])


def test_kill_point_is_read_from_the_environment_and_validated(monkeypatch):
    import os

    from nanochat.train.killpoints import ENV, KillPoint, kill_if_due, kill_point

    monkeypatch.delenv(ENV, raising=False)
    assert kill_point() is None
    monkeypatch.setenv(ENV, "after_copy:04")
    assert kill_point() == KillPoint("after_copy", 4, os.getpid())
    kill_if_due(kill_point(), "after_copy", 5)  # another step (or phase): nothing happens
    kill_if_due(kill_point(), "before_copy", 4)
    monkeypatch.setenv(ENV, "during_lunch:4")
    with pytest.raises(ValueError, match="before_copy, after_copy, after_record, before_export, after_export"):
        kill_point()


def test_a_folder_ray_never_recorded_is_not_a_resume_point(tmp_path):
    from nanochat.train.resume import read_run_record, run_path

    # A kill -9 between the copy and Ray's record leaves a complete-looking folder and no record.
    state = tmp_path / "base-d4" / "step_000004" / "train_state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"step": 4, "rows_consumed": 32}))
    assert read_run_record(run_path(str(tmp_path), "base-d4")) == []
    assert read_run_record(run_path(str(tmp_path), "no-such-run")) == []


def test_restart_forgets_metrics_summary_exports_and_the_ray_run(tmp_path):
    from nanochat.train.resume import forget_run

    stage_dir, run = tmp_path / "checkpoints" / "base" / "d4", tmp_path / "ray_results" / "base-d4"
    for d in (stage_dir / "step_000002", stage_dir / ".step_000004.tmp-x", run / "step_000002"):
        d.mkdir(parents=True)
    for f in ("metrics.jsonl", "summary.json"):
        (stage_dir / f).write_text("{}")
    (tmp_path / "checkpoints" / "base" / "d5").mkdir()
    forget_run(str(run), stage_dir)
    assert list(stage_dir.iterdir()) == [] and not run.exists()
    assert (tmp_path / "checkpoints" / "base" / "d5").exists()  # other tags untouched


def test_a_resumed_pretraining_stream_starts_at_the_checkpoints_row_after_any_number_of_resumes():
    from nanochat.train.checkpointing import TrainState, data_position

    assert data_position(TrainState(), 0, 1) == (0, 0, 0)  # fresh
    # Pretraining (epoch 0): the driver rebuilt the stream past the consumed rows; nothing left to drop,
    # also when the checkpoint came from a run that itself started mid-stream (rows_in_epoch counted from there).
    state = TrainState(step=2, epoch=0, rows_in_epoch=8, rows_consumed_per_worker=16)
    assert data_position(state, 16, 1) == (0, 0, 16)
    assert data_position(state, 32, 2) == (0, 0, 16)
    # A dataset given by the caller starts at row 0: replay the consumed rows (and mid/SFT in a later epoch).
    assert data_position(state, 0, 1) == (0, 16, 0)
    later = TrainState(epoch=2, rows_in_epoch=24, rows_consumed_per_worker=500)
    assert data_position(later, 0, 1) == (2, 24, 0)
    with pytest.raises(RuntimeError, match="starts 8 rows per worker past the checkpoint of step 2"):
        data_position(state, 24, 1)  # a data position from a newer checkpoint than the weights



def test_an_elastic_resume_with_another_worker_count_keeps_the_global_row_position():
    from nanochat.train.checkpointing import TrainState, data_position

    two = TrainState(step=4, epoch=0, rows_consumed_per_worker=16, rows_consumed=32, world_size=2)
    assert data_position(two, 0, 1) == (0, 32, 0)  # one worker left: all 32 rows are behind it
    assert data_position(two, 32, 1) == (0, 0, 32)  # a rebuilt stream: nothing to drop
    one = TrainState(step=4, epoch=1, rows_in_epoch=12, rows_consumed_per_worker=40, rows_consumed=40, world_size=1)
    assert data_position(one, 0, 2) == (1, 6, 0)  # regrown to two: 12 rows of the epoch, 6 each


def test_the_train_state_round_trips_through_its_checkpoint_folder(tmp_path):
    from nanochat.train.checkpointing import TrainState, model_dir, read_train_state, write_train_state

    state = TrainState(step=7, epoch=1, rows_in_epoch=40, rows_consumed_per_worker=120, rows_consumed=240,
                       world_size=2, ema={"value": 1.5, "count": 7}, train_seconds=12.5)
    write_train_state(tmp_path, state)
    assert read_train_state(tmp_path) == state
    assert model_dir(tmp_path, 7) == tmp_path / "model" / "step_000007"


def test_the_worker_config_crosses_ray_train_loop_config_as_plain_json():
    import pickle

    from nanochat.eval.chat_eval import letter_accuracy
    from nanochat.model import GPTConfig
    from nanochat.train.killpoints import KillPoint
    from nanochat.train.worker_config import WorkerConfig

    cfg = WorkerConfig(stage="sft", tag="d2", settings=TrainSettings(zero_stage=0), gpt=GPTConfig(n_layer=2),
                       sequence_len=32, num_iterations=5, tokenizer_dir="/tok", base_dir="/base",
                       kill_at=KillPoint("after_copy", 3, 1234), chat_evaluator=letter_accuracy)
    loop_config = cfg.to_loop_config()
    # Ray 2.60 types train_loop_config as a dict, pickles it to the workers and shows it as JSON.
    assert json.loads(json.dumps(loop_config)) == loop_config
    assert loop_config["chat_evaluator"] == "nanochat.eval.chat_eval.letter_accuracy"
    back = WorkerConfig.from_loop_config(pickle.loads(pickle.dumps(loop_config)))
    assert back == cfg and back.chat_evaluator is letter_accuracy and back.kill_at.step == 3
    with pytest.raises(ValueError, match="stage"):
        WorkerConfig.from_loop_config({**loop_config, "stage": "pretrain"})  # checkpoint names only


def test_a_loaded_preset_takes_overrides_directly_and_validates_them():
    from nanochat.config import apply_overrides

    preset = load_preset("tiny")
    changed = apply_overrides(preset, ["pretrain.matrix_lr=0.5", "ray.num_workers=2"])
    assert (changed.pretrain.matrix_lr, changed.ray.num_workers, changed.name) == (0.5, 2, "tiny")
    assert preset.pretrain.matrix_lr != 0.5  # the given preset is not changed
    assert apply_overrides(preset, []) == preset
    with pytest.raises(ConfigError, match="pretrain.zero_stage"):
        apply_overrides(preset, ["pretrain.zero_stage=7"])


def test_the_stage_definitions_import_without_torch():
    import subprocess
    import sys

    code = ("import sys, nanochat.stages as s; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(s.get_stage('mid').name, s.get_stage('sft').source, s.get_stage('pretrain').checkpoint)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["midtrain", "mid", "base"]
