"""torch.compile in the training loop: same losses as eager, off really off, the auto rule, the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers_train import tiny_overrides, token_datasets, token_rows

from nanochat.config import TrainSettings
from nanochat.train.compile import (
    COMPILE_MIN_EAGER_S,
    compile_stats,
    compile_training,
    eager,
    eager_seconds,
    resolve_compile,
)
from nanochat.train.compiled_ops import load_compiled_ops
from nanochat.train.optim import build_optimizer, compiled_orthogonalize, orthogonalize, set_lr
from nanochat.train.schedule import muon_momentum

# Compiled fp32 kernels fuse and reorder reductions (rms_norm, softmax, matmul tiling), so losses
# differ in the last bits and the gap may grow with each optimizer step: measured 5e-7 after 10
# steps on the 2-core Xeon. 1e-4 leaves room for other CPUs' vector widths and is still ~10^4 below
# how far the loss moves in those steps (~4 nats), so a wrong gradient or a skipped update fails.
LOSS_TOL = 1e-4


def _train_losses(tokenizer, compiled: bool, steps: int = 10, **settings) -> tuple[list[float], object]:
    """``steps`` optimizer steps of the loop's recipe (DeepSpeed, by default ZeRO 0 with Muon + AdamW) in fp32."""
    import deepspeed

    from nanochat.model import GPTConfig, build_model
    from nanochat.train.loop import deepspeed_config

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(config)
    settings = TrainSettings(device_batch_size=4, total_batch_size=128, matrix_lr=0.05, **settings)
    client_opt, _ = build_optimizer(model, settings, torch.float32)
    load_compiled_ops()  # never waits on a build lock a killed process left
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client_opt,
                                                   config=deepspeed_config(settings, 1, None))
    if compiled:
        assert compile_training(engine, client_opt, torch.device("cpu")) is None
    rows = token_rows(tokenizer, 32, 4 * steps, seed=3)
    losses = []
    for step in range(steps):
        set_lr(optimizer, 1.0, muon_momentum(step))
        batch = rows[4 * step: 4 * step + 4]
        x = torch.from_numpy(np.stack([r["inputs"] for r in batch])).long()
        y = torch.from_numpy(np.stack([r["targets"] for r in batch])).long()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine


def test_compiled_training_gives_the_eager_losses_and_keeps_the_checkpoint_format(tiny_tokenizer, gloo_world_of_one):
    eager_losses, eager_engine = _train_losses(tiny_tokenizer, compiled=False)
    compiled_losses, engine = _train_losses(tiny_tokenizer, compiled=True)
    after = compile_stats()
    assert engine.is_compiled and after["compile/graphs"] > 0  # it really compiled
    assert eager_losses[0] - eager_losses[-1] > 1.0  # the comparison is over real learning
    assert compiled_losses == pytest.approx(eager_losses, abs=LOSS_TOL)
    # Parameter names (our checkpoint format) are those of the plain model: no `_orig_mod.` prefix.
    assert list(engine.module.state_dict()) == list(eager_engine.module.state_dict())
    # Evaluation and sampling shapes run eager: no new graph for a different batch or length.
    with eager(), torch.no_grad():
        logits = engine.module(torch.zeros((3, 7), dtype=torch.long))
    assert logits.shape[:2] == (3, 7) and compile_stats() == after


@pytest.mark.parametrize("zero_stage", [1, 2, pytest.param(3, marks=pytest.mark.slow)])
def test_compiled_training_under_every_zero_stage_gives_the_eager_losses(tiny_tokenizer, gloo_world_of_one,
                                                                          zero_stage):
    adamw = {"optimizer": "adamw", "adamw_lr": 0.01, "zero_stage": zero_stage}
    eager_losses, _ = _train_losses(tiny_tokenizer, compiled=False, steps=4, **adamw)
    compiled_losses, engine = _train_losses(tiny_tokenizer, compiled=True, steps=4, **adamw)
    assert engine.is_compiled and compiled_losses == pytest.approx(eager_losses, abs=LOSS_TOL)


def test_compile_off_compiles_nothing(tiny_tokenizer, gloo_world_of_one):
    before = compile_stats()
    _train_losses(tiny_tokenizer, compiled=False, steps=2)
    assert compile_stats() == before


def _flops_per_token(depth: int, aspect: int, head_dim: int, seq: int, vocab: int) -> float:
    from nanochat.model import GPT, config_for_depth

    with torch.device("meta"):
        return GPT(config_for_depth(depth, vocab, sequence_len=seq, aspect_ratio=aspect, head_dim=head_dim)).estimate_flops()


def test_auto_compiles_when_minutes_of_training_are_left_and_never_under_zero3():
    cpu_peak = 100e9  # FLOP/s: a 2-core AVX-512 CPU's measured fp32 matmul rate, roughly
    # The tiny preset's pretraining (80 steps of 8192 tokens) is minutes of work: compiled.
    tiny = eager_seconds(80, 8192, _flops_per_token(4, 64, 64, 256, 4096), cpu_peak)
    assert tiny > COMPILE_MIN_EAGER_S and resolve_compile("auto", 0, tiny)[0] is True
    # The tests' 2-layer model for 80 steps is a second of work: compiling would cost more than it saves.
    small = eager_seconds(80, 256, _flops_per_token(2, 32, 32, 32, 384), cpu_peak)
    on, why = resolve_compile("auto", 0, small)
    assert small < 10 and not on and "s of training left" in why
    on, why = resolve_compile("auto", 3, 10 * COMPILE_MIN_EAGER_S)
    assert not on and "ZeRO-3" in why
    assert resolve_compile(True, 3, 0.0) == (True, "compile: true")
    assert resolve_compile(False, 0, 1e9) == (False, "compile: false")


def test_newton_schulz_runs_in_the_training_dtype_and_compiles_to_the_same_result(tiny_model_factory):
    model = tiny_model_factory()
    assert build_optimizer(model, TrainSettings(), torch.float32)[0].ns_dtype == torch.float32
    assert build_optimizer(model, TrainSettings(), torch.bfloat16)[0].ns_dtype == torch.bfloat16
    g = torch.randn(96, 48)
    plain = orthogonalize(g, 5, torch.float32)
    assert plain.dtype == torch.float32 and plain.shape == g.shape
    torch.testing.assert_close(compiled_orthogonalize()(g, 5, torch.float32), plain, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_ray_worker_compiles_once_and_a_resumed_run_loads_the_compiled_graphs_from_disk(
        tiny_tokenizer, base_dir, ray_session):
    from nanochat.train.metrics import read_jsonl
    from nanochat.train.trainer import train_stage

    tiny_tokenizer.save(base_dir / "tokenizer")

    def run(tag: str, compile_setting: str, **kwargs):
        # fp32, the precision LOSS_TOL is argued for: `dtype: auto` picks bf16 on CPUs with bf16 units, where
        # compiled and eager losses differed by 1.5e-4 after 3 steps (AMX Xeon).
        overrides = tiny_overrides(steps=6, pretrain__report_every=1, pretrain__eval_every=-1,
                                   pretrain__compile=compile_setting, pretrain__dtype="float32")
        result = train_stage("pretrain", "tiny", overrides=overrides, num_workers=1, tag=tag,
                             datasets=token_datasets(tiny_tokenizer, 32, train_rows=200, val_rows=8), **kwargs)
        return [r for r in read_jsonl(result.metrics_path) if "train/raw_loss" in r]

    first = run("c", "true", stop_at_step=3)
    assert all(r["compile"] == 1 for r in first)
    # Every graph was compiled during the first step; later steps reuse them (no recompilation).
    assert len({r["compile/graphs"] for r in first}) == 1 and first[0]["compile/graphs"] > 0
    resumed = [r for r in run("c", "true") if r["step"] > 3]  # a new worker process resumes from step 3
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert {r["compile/graphs"] for r in resumed} == {first[0]["compile/graphs"]}
    # The generated code came from the on-disk cache: nothing compiled anew.
    assert resumed[-1]["compile/fxgraph_cache_miss"] == 0 and resumed[-1]["compile/fxgraph_cache_hit"] > 0
    assert resumed[-1]["worker/peak_rss_mb"] > 0
    off = run("e", "false")
    assert all(r["compile"] == 0 and r["compile/graphs"] == 0 for r in off)
    compiled_losses = [r["train/raw_loss"] for r in first + resumed]
    assert compiled_losses == pytest.approx([r["train/raw_loss"] for r in off], abs=LOSS_TOL)
