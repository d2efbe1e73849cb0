"""`ray_jobs/*.py` are the CLI's commands: same flags, same --help, same errors (one pattern for all of them)."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from nanochat.cli import main as cli_main

JOBS = Path(__file__).resolve().parents[1] / "ray_jobs"
COMMANDS = {
    "pretrain": ["train", "pretrain"],
    "midtrain": ["train", "midtrain"],
    "sft": ["train", "sft"],
    "rl": ["train", "rl"],
    "eval": ["eval"],
    "pipeline": ["run"],
    "tune": ["tune"],
}


def _run_job(monkeypatch, name: str, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", [str(JOBS / f"{name}.py"), *argv])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repo root first
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(JOBS / f"{name}.py"), run_name="__main__")
    return exit_.value.code


def test_every_job_script_is_listed():
    assert sorted(p.stem for p in JOBS.glob("*.py")) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_job_script_prints_the_help_of_its_command(name, monkeypatch, capsys):
    assert _run_job(monkeypatch, name, "--help") == 0
    job_help = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main([*COMMANDS[name], "--help"])
    assert job_help == capsys.readouterr().out
    assert job_help.startswith(f"usage: nanochat {' '.join(COMMANDS[name])}")


def test_a_job_script_refuses_an_unknown_flag_like_the_cli(monkeypatch, capsys):
    assert _run_job(monkeypatch, "pretrain", "--no-such-flag") == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_a_job_script_fails_on_a_bad_preset_with_the_cli_message_and_code():
    proc = subprocess.run(
        [sys.executable, str(JOBS / "sft.py"), "--preset", "no-such-preset"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "error: unknown preset 'no-such-preset'" in proc.stderr
