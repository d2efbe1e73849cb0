"""A kill -9 at every phase of a checkpoint save, each followed by a rerun: the result equals an uninterrupted run.

One stage is killed again and again, at a different phase of a save each time, and finally rerun
to the end: every rerun starts from what the previous kill left. Each killed run is a driver
subprocess (joined to the session's Ray) that the ``NANOCHAT_DEBUG_KILL_AT`` seam of
nanochat.train.killpoints kills, together with the process doing the save (the Ray Train worker or
the Train controller); Ray then ends the rest of the dead job. Every rerun must resume from the
checkpoint Ray recorded, with the weights, the optimizer state and the data position of that one
checkpoint, so the per-step losses and evaluations must equal the uninterrupted reference exactly.
Pretraining reads real parquet shards, so the driver's data position (the stream restarts past the
consumed rows) is exercised too. One chain (9 runs) instead of one kill and one rerun per phase
(16 runs) keeps this affordable; the state each kill leaves is asserted on the way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_train import tiny_overrides, write_text_shards

from nanochat.checkpoint import load_checkpoint
from nanochat.train.killpoints import ENV
from nanochat.train.metrics import read_jsonl
from nanochat.train.resume import read_run_record, run_path
from nanochat.train.trainer import train_stage

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
# A checkpoint every step (Ray and the exports keep the newest 2); a loss line every step; evals at 0, 3, 6, 8.
# fp32: `dtype=auto` measures bf16 speed at start-up, which could pick differently between runs.
SETTINGS = ["pretrain.save_every=1", "pretrain.report_every=1", "pretrain.eval_every=3", "pretrain.dtype=float32",
            "pretrain.keep_checkpoints=2", "data.source=builtin"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tokenizer and two parquet shards that every run of this module trains on."""
    root = tmp_path_factory.mktemp("resume_corpus")
    tiny_tokenizer.save(root / "tokenizer")
    write_text_shards(root / "data" / "builtin")
    return root


def _base(path: Path, corpus: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "data"):
        (path / name).symlink_to(corpus / name)
    return path


def _pretrain(tag: str = "k"):
    return train_stage("pretrain", "tiny", overrides=tiny_overrides(steps=STEPS) + SETTINGS, num_workers=1, tag=tag)


KILLED_RUN = (
    "import sys; from nanochat.train.trainer import train_stage; "
    "train_stage('pretrain', 'tiny', overrides=sys.argv[1:], num_workers=1, tag='k')"
)


def _curve(metrics_path) -> list[tuple]:
    """(step, raw training loss, val loss) of every metrics line, in order."""
    return [(r["step"], r.get("train/raw_loss"), r.get("val/loss")) for r in read_jsonl(metrics_path)]


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory, ray_session):
    """One uninterrupted run: what every resumed run must reproduce."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(_base(tmp_path_factory.mktemp("reference") / "base", corpus)))
        mp.delenv(ENV, raising=False)
        result = _pretrain("ref")
    return result, _curve(result.metrics_path)


@pytest.fixture
def base(tmp_path, corpus, monkeypatch, ray_session) -> Path:
    path = _base(tmp_path / "base", corpus)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    return path


def _kill(base: Path, ray_session, kill_at: str) -> list:
    """Run the stage in a driver subprocess that the seam kills at ``kill_at``; Ray's record afterwards."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), ENV: kill_at, "PYTHONUNBUFFERED": "1",
           "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, *tiny_overrides(steps=STEPS), *SETTINGS], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, (kill_at, (killed.stdout + killed.stderr)[-3000:])
    return [r.step for r in read_run_record(run_path(str(base / "ray_results"), "base-k"))]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kills_at_every_phase_of_a_save_resume_exactly_like_an_uninterrupted_run(reference, base, ray_session):
    ref, ref_curve = reference
    run_dir, stage_dir = base / "ray_results" / "base-k", base / "checkpoints" / "base" / "k"

    def steps_in(folder: Path) -> list[int]:
        return sorted(int(p.name[5:]) for p in folder.glob("step_*"))

    def lines() -> list[int]:
        return [r["step"] for r in read_jsonl(stage_dir / "metrics.jsonl")]

    # Step 1 copied, never recorded: nothing is a resume point, the next run starts over.
    assert _kill(base, ray_session, "after_copy:1") == [] and 1 in steps_in(run_dir)
    # Step 2 only in local temp: resume from 1.
    assert _kill(base, ray_session, "before_copy:2") == [1] and 2 not in steps_in(run_dir)
    # Step 3 copied, not recorded: ignored and deleted; resume from 2, the data position of 2 (not 3).
    assert _kill(base, ray_session, "after_copy:3") == [1, 2] and 3 in steps_in(run_dir)
    # Step 4 recorded, then killed: no metrics line, no export yet; both repaired, resume from 4.
    assert _kill(base, ray_session, "after_record:4") == [3, 4]
    assert 4 not in lines() and 4 not in steps_in(stage_dir)
    # Step 5 recorded and its metrics line written, not exported.
    assert _kill(base, ray_session, "before_export:5") == [4, 5] and 5 not in steps_in(stage_dir)
    # Step 6 saved completely; killed right after. The resumed step is not evaluated twice.
    assert _kill(base, ray_session, "after_export:6") == [5, 6] and steps_in(stage_dir) == [5, 6]
    # The final step copied, not recorded: not "already finished"; the rerun trains step 8.
    assert _kill(base, ray_session, "after_copy:8") == [6, 7] and 8 in steps_in(run_dir)
    # The final step recorded, then killed before its metrics line, export and summary.
    assert _kill(base, ray_session, "after_record:8") == [7, 8]
    assert 8 not in lines() and not (stage_dir / "summary.json").exists()
    done = _pretrain()  # finished: completes the metrics, export and summary from Ray's record, trains nothing

    # Same weights, optimizer state and batches across eight kills: every step's loss and every evaluation
    # equal the reference (fp32, one worker, same thread count: deterministic, compared exactly).
    assert _curve(done.metrics_path) == ref_curve
    assert done.metrics["rows_consumed"] == ref.metrics["rows_consumed"] == STEPS * 8
    summary = json.loads(Path(done.summary_path).read_text())
    assert summary["metrics"]["step"] == STEPS and summary["metrics"]["val/bpb"] == ref.metrics["val/bpb"]
    assert summary["wall_seconds"] > 0  # the training time recorded in the final checkpoint, not 0

    # One record: Ray's kept checkpoints are the run dir's only step folders; the exports are the same steps.
    assert steps_in(run_dir) == steps_in(stage_dir) == [7, 8]
    assert not list(stage_dir.glob(".step_*"))
    final = load_checkpoint(done.checkpoint)
    assert done.checkpoint == str(stage_dir / "step_000008") and final.meta["step"] == STEPS
    assert final.tag == final.meta["tag"] == "k"  # the model id is the run's tag, not a temp folder's name
