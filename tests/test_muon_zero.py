"""nanochat's Muon + AdamW under DeepSpeed ZeRO 0/1/2/3 with 2 ranks: the ZeRO-0 losses, the reference
Muon step, Newton-Schulz on every matrix at every stage (nanochat/train/muon_zero.py, docs/training.md).

The unit-level comparisons run in one pair of gloo processes (torch.multiprocessing, started once for
the module): every configuration trains the same 3-layer model from the same weights on the same rows
(each rank its half of every global batch), fp32, gradient clipping 1.0 and a Muon momentum warm-up
compressed into the 10 steps (0.85 -> 0.95), so a stage that froze the momentum would drift. Three
blocks on two ranks put a ZeRO 1/2 partition boundary inside a matrix (block 1's c_fc), so the path
that orthogonalizes a matrix cut in two runs too. The reference is our MuonAdamW without DeepSpeed,
on one process with the whole global batch.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import NamedTuple

import numpy as np
import pytest
import torch
from _helpers_train import tiny_overrides, token_datasets, token_rows

from nanochat.config import ConfigError, TrainSettings, load_preset
from nanochat.model import GPTConfig, build_model
from nanochat.train.compiled_ops import load_compiled_ops
from nanochat.train.optim import MuonAdamW, attach_zero, build_optimizer, muon_adamw_groups, set_lr
from nanochat.train.schedule import muon_momentum

WORLD, STEPS, ROWS, SEQ = 2, 10, 4, 32
SETTINGS = {"device_batch_size": ROWS, "total_batch_size": WORLD * ROWS * SEQ, "matrix_lr": 0.05,
            "adamw_lr": 0.01}
# Every stage sums the same two fp32 gradients and clips by the same norm, summed in another order
# (partitioned norms, then combined), so losses differ in the last bits and the gap may grow through
# Newton-Schulz step after step: measured <= 5e-7 after 10 steps on the 2-core Xeon against ZeRO 0
# (compiled, offloaded and resumed runs included) and <= 1e-6 against the one-process reference.
# 1e-4 leaves room for other CPUs' kernels and compiled kernels (test_train_compile.py's bound) and is
# ~10^4 below how far the loss moves in those steps (~4 nats).
LOSS_TOL = 1e-4
# One step's change of the block matrices (the reference's is up to lr x scale = 0.1 per element):
# measured <= 2e-7 from the reference at every stage, compiled included (reduction order). The same
# step without Newton-Schulz (a Muon silently degraded to momentum SGD) is 3.1e-2 away: 600x the bound.
# The AdamW embedding is left to the loss tests: Adam's first step is lr * g / (|g| + 1e-10), so an
# element whose gradient is ~1e-10 moves by up to lr (0.69) with the last bits of g (1.6e-3 compiled).
UPDATE_TOL = 5e-5


class Config(NamedTuple):
    zero_stage: int
    offload: bool = False
    compiled: bool = False  # compile_training (forward/backward, Newton-Schulz), as compile: auto at ZeRO < 3
    resume_at: int | None = None  # save the engine state there, rebuild everything and load it
    optimizer: str = "muon_adamw"


CONFIGS = {
    "z0": Config(0), "z1": Config(1), "z2": Config(2), "z3": Config(3),
    "z2_offload": Config(2, offload=True), "z3_offload": Config(3, offload=True),
    "z1_compiled": Config(1, compiled=True), "z2_compiled": Config(2, compiled=True),
    "z2_resumed": Config(2, resume_at=5), "z3_resumed": Config(3, resume_at=5),
    "adamw_z0": Config(0, optimizer="adamw"), "adamw_z2_offload": Config(2, offload=True, optimizer="adamw"),
    "adamw_z3_offload": Config(3, offload=True, optimizer="adamw"),
}
MUON = [n for n, c in CONFIGS.items() if c.optimizer == "muon_adamw" and c.resume_at is None]


def _momentum(step: int) -> float:
    return muon_momentum(step, ramp_steps=STEPS - 1)


def _model(vocab: int):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=SEQ, vocab_size=vocab, n_layer=3, n_head=2, n_kv_head=2, n_embd=64)
    model = build_model(config)
    with torch.no_grad():  # the reference init zeroes the head and projections: give every matrix a gradient
        for p in model.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def _batch(rows, step: int, rank: int | None):
    """Rank ``rank``'s rows of global batch ``step``; both ranks' rows when ``rank`` is None."""
    lo = step * WORLD * ROWS + (rank or 0) * ROWS
    part = rows[lo: lo + (ROWS if rank is not None else WORLD * ROWS)]
    x = torch.from_numpy(np.stack([r["inputs"] for r in part])).long()
    y = torch.from_numpy(np.stack([r["targets"] for r in part])).long()
    return x, y


def _engine(config: Config, vocab: int):
    import deepspeed

    from nanochat.train.compile import compile_training
    from nanochat.train.loop import deepspeed_config

    settings = TrainSettings(**SETTINGS, zero_stage=config.zero_stage, offload_optimizer=config.offload,
                             optimizer=config.optimizer)
    client, _ = build_optimizer(model := _model(vocab), settings, torch.float32)
    load_compiled_ops()  # never waits on a build lock a killed process left
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client,
                                                   config=deepspeed_config(settings, 1, None))
    attach_zero(optimizer)
    if config.compiled:
        assert compile_training(engine, client, torch.device("cpu")) is None
    return engine, optimizer, client


def _rank_main(rank: int, store: str, out: str, rows, vocab: int, configs: dict[str, Config]) -> None:
    """One of the two gloo ranks: every configuration in turn, rank 0 saves what it saw."""
    import torch.distributed as dist

    from nanochat.train.checkpointing import (
        TrainState,
        full_model_state,
        load_engine_state,
        save_engine_state,
    )

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(minutes=5))
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("WARNING")
    results = {}
    for name, config in configs.items():
        engine, optimizer, client = _engine(config, vocab)
        losses, after_first = [], None
        for step in range(STEPS):
            if step == config.resume_at:  # a restart: new processes' worth of objects, same weights and state
                folder = f"{out}.{name}"
                save_engine_state(engine, folder)
                dist.barrier()
                engine.destroy()
                engine, optimizer, client = _engine(config, vocab)  # starts from the initial weights again
                load_engine_state(engine, folder, TrainState(world_size=WORLD), WORLD, config.zero_stage)
            set_lr(optimizer, 1.0, _momentum(step))
            x, y = _batch(rows, step, rank)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / WORLD)
            if step == 0:
                after_first = full_model_state(engine, config.zero_stage, rank)
        counts = [None] * WORLD
        dist.all_gather_object(counts, getattr(client, "ns_counts", None))
        results[name] = {"losses": losses, "after_first": after_first, "ns_counts": counts,
                         "shapes": getattr(client, "matrix_shapes", None), "compiled": engine.is_compiled}
        engine.destroy()
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo sometimes aborts at interpreter exit (docs: ray-on-this-machine pitfall 7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """Every configuration of CONFIGS, trained once by two gloo ranks (~1-2 min on 2 cores)."""
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("muon_zero")
    rows = token_rows(tiny_tokenizer, SEQ, STEPS * WORLD * ROWS, seed=3)
    mp.spawn(_rank_main, args=(str(d / "store"), str(d / "out.pt"), rows, tiny_tokenizer.vocab_size, CONFIGS),
             nprocs=WORLD, join=True)
    results = torch.load(d / "out.pt", weights_only=False)
    return {"results": results, "rows": rows, "vocab": tiny_tokenizer.vocab_size}


def _reference(rows, vocab: int, steps: int = STEPS, sgd_first_step: bool = False):
    """Our MuonAdamW without DeepSpeed, one process, the whole global batch: losses, weights after step 1.

    ``sgd_first_step``: the Muon update without Newton-Schulz (what a silently degraded Muon does).
    """
    model = _model(vocab)
    opt = MuonAdamW(muon_adamw_groups(model, TrainSettings(**SETTINGS)), ns_dtype=torch.float32)
    if sgd_first_step:
        opt.orthogonalized = lambda index, u, steps=5: u
    losses, after_first = [], None
    for step in range(steps):
        set_lr(opt, 1.0, _momentum(step))
        loss = model(*_batch(rows, step, None))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            after_first = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, after_first


def _max_diff(a: dict, b: dict) -> float:
    """Largest difference between two state dicts' block matrices."""
    return max((a[k] - b[k]).abs().max().item() for k in a if ".h." in k)


@pytest.mark.slow
def test_zero0_muon_on_two_ranks_trains_as_the_reference_muon(runs):
    losses, _ = _reference(runs["rows"], runs["vocab"])
    z0 = runs["results"]["z0"]["losses"]
    assert z0[0] - z0[-1] > 1.0  # real learning over the 10 steps
    assert z0 == pytest.approx(losses, abs=LOSS_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("z0", "adamw_z0")])
def test_muon_under_every_zero_stage_gives_the_zero0_losses(runs, name):
    """Also compiled, offloaded, and resumed half-way from a checkpoint; AdamW (offloaded) against AdamW."""
    results, config = runs["results"], CONFIGS[name]
    zero0 = results["z0" if config.optimizer == "muon_adamw" else "adamw_z0"]["losses"]
    assert results[name]["losses"] == pytest.approx(zero0, abs=LOSS_TOL)
    assert zero0[0] - zero0[-1] > 1.0
    assert results[name]["compiled"] == config.compiled


@pytest.mark.slow
@pytest.mark.parametrize("name", MUON)
def test_first_step_is_the_reference_muon_step_on_the_same_gradients(runs, name):
    _, reference = _reference(runs["rows"], runs["vocab"], steps=1)
    _, degraded = _reference(runs["rows"], runs["vocab"], steps=1, sgd_first_step=True)
    start = _model(runs["vocab"]).state_dict()
    after = runs["results"][name]["after_first"]
    assert _max_diff(after, reference) < UPDATE_TOL
    # The comparison can tell a Muon step from a degraded one, and the step moved every matrix.
    assert _max_diff(reference, degraded) > 100 * UPDATE_TOL
    for key in (k for k, v in start.items() if v.dim() == 2 and ".h." in k):
        assert (after[key] - start[key]).abs().max() > 1e-3, key


@pytest.mark.slow
@pytest.mark.parametrize("name", MUON)
def test_newton_schulz_runs_on_every_matrix_every_step(runs, name):
    run = runs["results"][name]
    counts = np.array(run["ns_counts"])  # (rank, matrix): orthogonalizations over the STEPS steps
    assert counts.shape == (WORLD, len(run["shapes"])) and len(run["shapes"]) == 3 * 6  # 6 matrices per block
    zero_stage = CONFIGS[name].zero_stage
    if zero_stage == 0:  # replicated: every rank orthogonalizes every matrix
        assert (counts == STEPS).all()
    elif zero_stage == 3:  # dealt out: exactly one rank per matrix, both ranks share the work
        assert (counts.sum(axis=0) == STEPS).all() and (counts.sum(axis=1) > 0).all()
    else:  # by partition: a matrix cut by the partition boundary runs on both of its ranks
        total = counts.sum(axis=0)
        assert ((total == STEPS) | (total == 2 * STEPS)).all() and (counts.sum(axis=1) > 0).all()
        assert (total == 2 * STEPS).sum() == 1  # the cut matrix
        assert (counts % STEPS == 0).all()  # every step, never skipped


def test_muon_is_accepted_with_every_zero_stage_and_offload():
    for stage in (0, 1, 2, 3):
        assert load_preset("tiny", [f"pretrain.zero_stage={stage}"]).pretrain.optimizer == "muon_adamw"
    preset = load_preset("tiny", ["pretrain.zero_stage=3", "pretrain.offload_optimizer=true"])
    assert preset.pretrain.optimizer == "muon_adamw" and preset.pretrain.offload_optimizer
    with pytest.raises(ConfigError, match="offload_optimizer=true needs zero_stage 2 or 3"):
        load_preset("tiny", ["pretrain.zero_stage=1", "pretrain.offload_optimizer=true"])


def test_a_zero_partition_it_was_not_told_about_is_an_error_not_an_sgd_step():
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = MuonAdamW([{"params": [w], "kind": "muon", "lr": 0.1}], ns_dtype=torch.float32)
    flat = torch.nn.Parameter(w.detach().reshape(-1).clone())  # what ZeRO 1/2 hand the optimizer
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="attach_zero"):
        opt.step()
    attach_zero(opt)  # ZeRO 0: nothing to attach; the matrix itself steps and is counted
    opt.param_groups[0]["params"] = [w]
    w.grad = torch.randn_like(w)
    opt.step()
    assert opt.ns_counts == [1]


def test_gpu_presets_train_muon_under_zero2():
    for name in ("d20", "d26", "d32"):
        preset = load_preset(name)
        for stage in (preset.pretrain, preset.midtrain, preset.sft):
            assert (stage.optimizer, stage.zero_stage) == ("muon_adamw", 2), name


# ---- the real path: train_stage on Ray Train, 2 workers, ZeRO 2 + Muon ---------------------------------


@pytest.mark.slow
def test_train_stage_with_two_workers_zero2_muon_matches_zero0(base_dir, tiny_tokenizer, ray_session):
    """The loop's own path (Ray Train workers, Ray Data shards, attach_zero, the muon/ns_* report metrics):
    same rows and seed, so the per-step losses agree within LOSS_TOL as in the unit comparisons."""
    from nanochat.train.metrics import read_jsonl
    from nanochat.train.trainer import train_stage

    tiny_tokenizer.save(base_dir / "tokenizer")
    steps, raw = 6, {}
    for stage in (0, 2):
        result = train_stage(
            "pretrain", "tiny", num_workers=2, tag=f"muon_z{stage}",
            # fp32 as in the unit comparisons (LOSS_TOL's precision; `dtype: auto` is bf16 on an AMX Xeon)
            overrides=tiny_overrides(steps=steps) + [f"pretrain.zero_stage={stage}", "pretrain.compile=false",
                                                     "pretrain.report_every=1", "pretrain.eval_every=-1",
                                                     "pretrain.dtype=float32"],
            datasets=token_datasets(tiny_tokenizer, 32, train_rows=200, val_rows=32),
        )
        records = [r for r in read_jsonl(result.metrics_path) if "train/raw_loss" in r]
        raw[stage] = [r["train/raw_loss"] for r in records]
        assert [r["step"] for r in records] == list(range(1, steps + 1))
        # Newton-Schulz ran on every matrix at every step, on some rank (ZeRO 0: on both).
        assert records[-1]["muon/ns_min"] >= steps * (2 if stage == 0 else 1)
    assert raw[0][0] - raw[0][-1] > 0.5
    assert raw[2] == pytest.approx(raw[0], abs=LOSS_TOL)
