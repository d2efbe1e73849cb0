"""Ray Tune sweeps: search-space parsing (fast) and a real 4-trial ASHA sweep (slow)."""

from __future__ import annotations

import csv

import pytest

from nanochat.config import ConfigError, load_preset
from nanochat.tune import SweepError, parse_space, trial_preset


def test_space_specs_become_tune_domains():
    space = parse_space(["pretrain.matrix_lr=loguniform(0.005,0.05)", "model.depth=choice(2,4)", "pretrain.warmdown_ratio=grid(0.2,0.4)"])
    assert 0.005 <= space["pretrain.matrix_lr"].sample() <= 0.05
    assert space["model.depth"].sample() in (2, 4)
    assert space["pretrain.warmdown_ratio"] == {"grid_search": [0.2, 0.4]}


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("pretrain.matrix_lr", "KEY=KIND(ARGS)"),
        ("pretrain.matrix_lr=normal(0,1)", "KEY=KIND(ARGS)"),
        ("pretrain.matrix_lr=uniform(1)", "two bounds"),
        ("model.depth=choice()", "at least one value"),
    ],
)
def test_bad_space_specs_say_how_to_write_them(spec, fragment):
    with pytest.raises(SweepError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_space([spec])


def test_trial_preset_applies_sampled_values_and_reports_at_eval_steps():
    preset = trial_preset("tiny", ["pretrain.eval_every=20"], {"pretrain.matrix_lr": 0.011, "model.depth": 2})
    assert preset.pretrain.matrix_lr == 0.011 and preset.model.depth == 2
    assert preset.pretrain.report_every == 20  # one Tune iteration per validation bpb


def test_trial_preset_rejects_unknown_fields_before_any_trial():
    with pytest.raises(ConfigError, match="no_such_field"):
        trial_preset("tiny", [], {"pretrain.no_such_field": 1})


SWEEP_OVERRIDES = [
    "pretrain.num_iterations=8",
    "pretrain.eval_every=2",
    "pretrain.eval_tokens=4096",
    "pretrain.total_batch_size=2048",
    "pretrain.device_batch_size=8",
    "pretrain.save_every=-1",
    "model.depth=2",
    "model.sequence_len=128",
    "ray.cpus_per_worker=0.5",
]


@pytest.mark.slow
def test_tiny_sweep_with_asha_stops_a_trial_early_and_best_preset_trains(ray_session, prepared_tiny_data):
    from nanochat.train.trainer import train_stage
    from nanochat.tune import run_sweep

    result = run_sweep(
        "tiny",
        SWEEP_OVERRIDES,
        ["pretrain.matrix_lr=grid(0.0001,0.03,0.001,0.02)"],  # one LR far too small: ASHA should cut it
        num_samples=1,
        name="test-sweep",
        max_concurrent=2,
    )
    assert result.num_trials == 4
    rows = list(csv.DictReader(result.table.open()))
    assert len(rows) == 4 and all(r["error"] == "" for r in rows)
    assert result.num_stopped_early >= 1, rows
    assert result.plot.stat().st_size > 1000 and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_preset(str(result.best_preset))
    assert best.pretrain.matrix_lr == result.best_params["pretrain.matrix_lr"]
    summary = train_stage("pretrain", load_preset(str(result.best_preset), ["pretrain.num_iterations=2"]), tag="best")
    assert summary is not None
