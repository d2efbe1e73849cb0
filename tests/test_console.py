"""What a long command prints: progress as a bar or as plain lines, and only the worker lines that need the user."""

from __future__ import annotations

import io
import json
import time

import pytest

from nanochat import progress
from nanochat.ray_console import dashboard_enabled, forward_worker_warnings
from nanochat.train.metrics import format_log_line

RECORDS = [
    {"stage": "base", "step": 0, "num_iterations": 80, "val/bpb": 3.37, "val/loss": 8.31},
    {"stage": "base", "step": 10, "num_iterations": 80, "train/loss": 6.53, "train/lr_mult": 1.0,
     "train/tok_per_sec": 4500.0, "train/mfu": 0.14, "train/data_wait_frac": 0.19},
    {"stage": "base", "step": 80, "num_iterations": 80, "train/loss": 4.67, "train/tok_per_sec": 4700.0,
     "val/bpb": 1.78, "samples": ["The capital of France is Paris"]},
]

# Lines Ray printed on the console of `nanochat run --preset tiny` before the console was filtered.
RAY_NOISE = [
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing to monitor.",
    "Reporting training result 2: TrainingReport(checkpoint=None, metrics={'train/loss': 6.5}) from rank 0",
    "[2026-11-30 14:09:46,317 E 19778 19875] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' has "
    "constructor arguments in the object store and max_restarts > 0.",
    "Starting execution of Dataset val_0356b. Full logs are in /tmp/ray/session_x/logs/ray-data",
    "14:10:00 INFO nanochat.train.loop: compile auto: on (~260 s of eager training left)",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_training_progress_is_one_plain_line_per_report_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    out = io.StringIO()
    bar = progress.TrainProgress("pretrain", 80, line=format_log_line, stream=out)
    for record in RECORDS:
        bar.record(record)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [format_log_line(RECORDS[0]), format_log_line(RECORDS[1]), format_log_line(RECORDS[2]),
                     "  sample: 'The capital of France is Paris'"]
    assert lines[1] == "base step 10/80 | loss 6.5300 | lr 1.00 | 4.5K tok/s | mfu 14.0% | wait 19%"
    assert "\r" not in out.getvalue()


def test_training_progress_draws_one_bar_with_loss_speed_and_eta_on_a_terminal(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    out = _Tty()
    bar = progress.TrainProgress("pretrain", 80, line=format_log_line, stream=out)
    for record in RECORDS[:2]:
        bar.record(record)
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "pretrain:" in text and "10/80" in text
    assert "loss 6.530" in text and "4.5K tok/s" in text and "val bpb 3.370" in text
    assert "<" in text  # tqdm's elapsed<remaining (the ETA)
    assert format_log_line(RECORDS[1]) not in text  # no plain lines on a terminal


@pytest.mark.parametrize("forced, drawn", [("plain", False), ("bar", True)])
def test_nanochat_progress_env_forces_plain_lines_or_bars(monkeypatch, forced, drawn):
    monkeypatch.setenv(progress.PROGRESS_ENV, forced)
    assert progress.interactive(_Tty()) is drawn
    assert progress.interactive(io.StringIO()) is drawn


def test_an_eval_bar_prints_a_line_per_quarter_and_one_at_the_end_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    out = io.StringIO()
    with progress.Bar(8, "ARC-Easy", unit="ex", plain_every=2, stream=out) as bar:
        for _ in range(4):
            bar.update(2)
    assert out.getvalue().splitlines() == ["ARC-Easy: 2/8 ex", "ARC-Easy: 4/8 ex", "ARC-Easy: 6/8 ex",
                                           "ARC-Easy: 8/8 ex"]


def test_follow_jsonl_reports_only_lines_appended_while_it_runs_even_split_across_writes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": -1}) + "\n")  # a previous run's record: not shown again
    seen: list[dict] = []
    with progress.follow_jsonl(path, seen.append, poll_s=0.05):
        with open(path, "a") as f:
            f.write(json.dumps({"step": 1}) + "\n" + '{"step": ')
            f.flush()
            time.sleep(0.3)  # the follower reads the half-written line's first part: it must wait for the rest
            f.write("2}\n")
    assert seen == [{"step": 1}, {"step": 2}]


def test_follow_jsonl_keeps_running_when_the_callback_fails(tmp_path):
    path = tmp_path / "metrics.jsonl"
    calls: list[int] = []

    def fails_first(record: dict) -> None:
        calls.append(record["step"])
        if record["step"] == 1:
            raise ValueError("a console problem")

    with progress.follow_jsonl(path, fails_first, poll_s=0.05):
        path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n")
    assert calls == [1, 2]


def test_only_nanochat_warnings_from_workers_reach_the_quiet_console(capsys):
    warning = "14:10:02 WARNING nanochat.train.loop: compile off: torch.compile does not work on this worker"
    py_warning = "/work/main/nanochat/config.py:88: FutureWarning: serve.host is ignored"
    forward_worker_warnings({"lines": [*RAY_NOISE, warning, py_warning], "actor_name": "RayTrainWorker", "pid": 7})
    forward_worker_warnings({"lines": RAY_NOISE, "task_name": "ReadFiles", "pid": 8})
    assert capsys.readouterr().err.splitlines() == [f"(RayTrainWorker) {warning}", f"(RayTrainWorker) {py_warning}"]


def test_a_worker_warning_printed_during_a_bar_goes_above_it(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    out = _Tty()
    bar = progress.Bar(10, "pretrain", stream=out)
    bar.update(3)
    progress.write("(RayTrainWorker) 14:10 WARNING nanochat.x: look", out)
    bar.close()
    assert "(RayTrainWorker) 14:10 WARNING nanochat.x: look\n" in out.getvalue()


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False), ("false", False), ("off", False)])
def test_the_dashboard_is_on_unless_nanochat_dashboard_turns_it_off(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("NANOCHAT_DASHBOARD", raising=False)
    else:
        monkeypatch.setenv("NANOCHAT_DASHBOARD", value)
    assert dashboard_enabled() is on


def test_console_options_hold_for_the_command_and_are_undone_after(monkeypatch):
    monkeypatch.delenv(progress.VERBOSE_ENV, raising=False)
    monkeypatch.setenv("NANOCHAT_DASHBOARD", "1")
    with progress.console_options(verbose=True, dashboard=False):
        assert progress.verbose() and not dashboard_enabled()
    assert not progress.verbose() and dashboard_enabled()


@pytest.mark.parametrize("command", [["run"], ["train", "pretrain"], ["train", "sft"], ["eval", "base"],
                                     ["eval", "chat"], ["tune"], ["serve"]])
def test_every_command_that_starts_ray_takes_verbose_and_no_dashboard(command):
    from nanochat.cli import build_parser

    args = build_parser().parse_args([*command, "-v", "--no-dashboard"])
    assert args.uses_ray and args.verbose and args.no_dashboard
    quiet = build_parser().parse_args(command)
    assert not quiet.verbose and not quiet.no_dashboard


def test_the_bar_of_midtraining_shows_the_val_loss_it_reports_instead_of_bpb(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    out = _Tty()
    bar = progress.TrainProgress("midtrain", 60, stream=out)
    bar.record({"stage": "mid", "step": 30, "num_iterations": 60, "train/loss": 3.7, "val/loss": 4.08})
    bar.close()
    assert "val loss 4.080" in out.getvalue() and "bpb" not in out.getvalue()
