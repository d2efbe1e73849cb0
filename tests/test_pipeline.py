"""The main job end to end: every stage, a crash during SFT resumed at SFT, a rerun that skips all.

Fast tests cover the stage bookkeeping; the slow one runs the real pipeline (real Ray, DeepSpeed,
parquet, evals, report) as a user does: the ``nanochat`` console script in a subprocess. The pipeline
as a ``ray job submit`` (stopped and resubmitted) is tests/test_multinode.py's, on its two-node cluster.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat.common import NanochatError
from nanochat.config import load_preset
from nanochat.pipeline import STAGE_NAMES, RunState, run_pipeline, run_state_path

VENV_BIN = Path(sys.executable).parent
NANOCHAT = str(VENV_BIN / "nanochat")

# The tiny preset, made smaller still so the whole life cycle fits a CI test (a few minutes).
E2E_OVERRIDES = [
    "pretrain.num_iterations=40", "pretrain.eval_every=20", "pretrain.save_every=20", "pretrain.eval_tokens=16384",
    "midtrain.num_iterations=20", "midtrain.eval_every=10", "midtrain.eval_tokens=8192",
    "sft.num_iterations=24", "sft.eval_every=12", "sft.save_every=6", "sft.eval_tokens=4096",
    "eval.core_max_per_task=4", "eval.chat_max_problems=8", "eval.max_new_tokens=32",
    "mixture.val_max=64",
    "rl.num_iterations=4", "rl.num_samples=4", "rl.questions_per_step=8", "rl.eval_every=-1",
    "rl.eval_questions=16", "rl.save_every=2",
]


def _set_args(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_unknown_stage_names_are_refused_with_the_list(base_dir):
    with pytest.raises(NanochatError, match="choose one of"):
        run_pipeline(load_preset("tiny"), from_stage="pretraining")


def test_run_state_persists_and_resets(base_dir):
    preset = load_preset("tiny")
    state = RunState(run_state_path(preset))
    state.mark("data", "done", seconds=1.0)
    state.mark("tokenizer", "failed", error="boom")
    again = RunState(run_state_path(preset))
    assert again.done("data") and not again.done("tokenizer")
    again.reset(["data"])
    assert not RunState(run_state_path(preset)).done("data")


def test_completed_stages_are_skipped_and_from_stage_reruns(base_dir, monkeypatch):
    import nanochat.pipeline as pipeline

    calls: list[tuple[str, bool]] = []
    stages = [pipeline.Stage(s.name, s.description, lambda p, t, fresh, base, n=s.name: calls.append((n, fresh)) or {}) for s in pipeline.STAGES]
    monkeypatch.setattr(pipeline, "STAGES", stages)
    preset = load_preset("tiny")
    run_pipeline(preset, stop_after="tok_eval")
    assert calls == [("data", False), ("tokenizer", False), ("tok_eval", False)]
    calls.clear()
    run_pipeline(preset, stop_after="tok_eval")
    assert calls == []  # finished stages are skipped
    run_pipeline(preset, from_stage="tokenizer", stop_after="tok_eval")
    assert calls == [("tokenizer", True), ("tok_eval", True)]  # a requested rerun starts over


def test_a_failed_stage_is_recorded_and_the_rerun_starts_there(base_dir, monkeypatch):
    import nanochat.pipeline as pipeline

    calls: list[str] = []
    attempts = {"tok_eval": 0}

    def make(name):
        def run(preset, tag, fresh, base):
            calls.append(name)
            if name == "tok_eval":
                attempts[name] += 1
            if name == "tok_eval" and attempts[name] == 1:
                raise RuntimeError("simulated crash")
            return {}

        return run

    monkeypatch.setattr(pipeline, "STAGES", [pipeline.Stage(s.name, s.description, make(s.name)) for s in pipeline.STAGES])
    preset = load_preset("tiny")
    with pytest.raises(RuntimeError):
        run_pipeline(preset, stop_after="pretrain")
    state = json.loads(run_state_path(preset).read_text())["stages"]
    assert state["tok_eval"]["status"] == "failed" and "simulated crash" in state["tok_eval"]["error"]
    calls.clear()
    run_pipeline(preset, stop_after="pretrain")
    assert calls == ["tok_eval", "pretrain"]


def _stages(base: Path) -> dict:
    path = base / "runs" / "tiny" / "stages.json"
    return json.loads(path.read_text())["stages"] if path.exists() else {}


def _env(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(NANOCHAT_BASE_DIR=str(base), PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_main_command_runs_every_stage_resumes_after_a_crash_in_sft_and_skips_when_done(tmp_path):
    base = tmp_path / "nanochat"
    cmd = [NANOCHAT, "run", "--preset", "tiny", *_set_args(E2E_OVERRIDES)]
    log1 = (tmp_path / "run1.log").open("w")
    proc = subprocess.Popen(cmd, env=_env(base), stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    sft_run = base / "ray_results" / "sft-d4"
    try:
        while proc.poll() is None:  # kill the whole job once Ray has recorded SFT's first checkpoint
            if _stages(base).get("sft", {}).get("status") == "running" and (
                    sft_run / "checkpoint_manager_snapshot.json").exists():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(1)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log1.close()
    stages = _stages(base)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "run1.log").read_text()[-3000:]
    assert all(stages[s]["status"] == "done" for s in STAGE_NAMES[: STAGE_NAMES.index("sft")]), stages
    assert stages["sft"]["status"] == "running"  # the crash left SFT unfinished

    second = subprocess.run(cmd, env=_env(base), capture_output=True, text=True, timeout=1800)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    for stage in STAGE_NAMES[: STAGE_NAMES.index("sft")]:
        assert f"{stage:<9} done already" in out, stage
    assert "resuming sft/d4 from the latest checkpoint" in out
    assert all(s["status"] == "done" for s in _stages(base).values())

    report = base / "report" / "report.md"
    text = report.read_text()
    for section in ("Tokenizer", "Base", "Mid", "SFT", "| Metric | BASE | MID | SFT | RL |", "(partial: mean of"):
        assert section in text, section
    assert "{'core'" not in text  # numbers, not raw result dicts
    pngs = list(report.parent.glob("*.png"))
    assert {"base_loss.png", "mid_loss.png", "sft_loss.png"} <= {p.name for p in pngs}
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "> Who are you?" in out  # the sample chat answer printed at the end

    third = subprocess.run(cmd, env=_env(base), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert all(f"{s:<9} done already" in third.stdout + third.stderr for s in STAGE_NAMES)
