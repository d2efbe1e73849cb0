"""The run report: built from realistic artifact files written here, complete and partial runs.

(The end-to-end check against a real tiny run's outputs lives with the pipeline tests.)
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from nanochat.cli import main as cli_main
from nanochat.report import build_report, collect, fmt, fmt_duration, latest_tag

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CORE_TASKS = ["hellaswag_zeroshot", "arc_easy", "copa", "lambada_openai", "bigbench_dyck_languages"]
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write_tokenizer(root: Path) -> None:
    write_json(root / "tokenizer" / "tok_train.json", {
        "vocab_size": 4096, "chars": 2_000_000, "documents": 1234, "seconds": 12.5, "source": "shakespeare",
        "max_chars": 2_000_000, "doc_cap": 10000, "fingerprint": "abc123"})
    write_json(root / "tokenizer" / "tok_eval.json", {
        "tokenizer": str(root / "tokenizer"), "vocab_size": 4096, "baselines": {"gpt2": True, "gpt4": False},
        "rows": [
            {"text": "news", "bytes": 1819, "ours": {"tokens": 520, "ratio": 3.498},
             "gpt2": {"tokens": 404, "ratio": 4.502, "diff_pct": -28.7}, "gpt4": None},
            {"text": "code", "bytes": 1259, "ours": {"tokens": 610, "ratio": 2.064},
             "gpt2": {"tokens": 576, "ratio": 2.186, "diff_pct": -5.9}, "gpt4": None},
        ]})


def write_stage(root: Path, stage: str, tag: str, steps: int = 20, finished: bool = True,
                bpb: bool = True, torn_tail: bool = False) -> None:
    d = root / "checkpoints" / stage / tag
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    t0 = 1_700_000_000.0
    for step in range(1, steps + 1):
        rec = {"stage": stage, "step": step, "num_iterations": steps, "time": t0 + step,
               "train/loss": 6.0 / (1 + 0.1 * step), "train/lr_mult": 1.0, "train/tok_per_sec": 5000.0 + step,
               "train/mfu": 0.01, "train/data_wait_frac": 0.05, "total_flops": 1e12 * step,
               "tokens_seen": 4096 * step}
        if step % 5 == 0:
            rec["val/loss"] = 5.5 / (1 + 0.1 * step)
            if bpb:
                rec["val/bpb"] = 2.5 / (1 + 0.05 * step)
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if torn_tail:
        text += '{"stage": "base", "step": 99, "train/lo'
    (d / "metrics.jsonl").write_text(text)
    if finished:
        (d / f"step_{steps:06d}").mkdir(exist_ok=True)
        write_json(d / "summary.json", {
            "stage": stage, "tag": tag, "checkpoint": str(d / f"step_{steps:06d}"), "num_iterations": steps,
            "num_params": 3_456_789, "wall_seconds": 600.0, "metrics": {"train/loss": 2.1},
            "config": {"model": {"depth": 4}}, "source_checkpoint": None})


def write_base_eval(root: Path, tag: str) -> None:
    tasks = {name: {"accuracy": 0.3 + 0.05 * i, "centered": 0.02 * i - 0.01, "n": 100}
             for i, name in enumerate(CORE_TASKS)}
    write_json(root / "eval" / "base" / tag / "results.json", {
        "kind": "base", "checkpoint": f"checkpoints/base/{tag}/step_000020", "step": 20, "tasks": tasks,
        "core": 0.0312, "core_partial": True, "core_tasks": CORE_TASKS, "chatcore": None,
        "bpb": {"train": 2.01, "val": 2.07}, "seconds": 120.0})


def write_chat_eval(root: Path, stage: str, tag: str, scale: float = 1.0) -> None:
    tasks = {name: {"accuracy": round(scale * (0.1 + 0.05 * i), 4), "centered": 0.01 * i, "n": 50}
             for i, name in enumerate(CHAT_TASKS)}
    write_json(root / "eval" / stage / tag / "results.json", {
        "kind": "chat", "checkpoint": f"checkpoints/{stage}/{tag}/step_000010", "step": 10, "tasks": tasks,
        "core": None, "chatcore": 0.0123 * scale, "seconds": 60.0})


def full_run(root: Path, tag: str = "d4") -> None:
    write_tokenizer(root)
    write_stage(root, "base", tag)
    write_base_eval(root, tag)
    write_stage(root, "mid", tag, steps=10, bpb=False)
    write_chat_eval(root, "mid", tag)
    write_stage(root, "sft", tag, steps=10, bpb=False)
    write_chat_eval(root, "sft", tag, scale=1.2)


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, path
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[0] > 50


def summary_row(text: str, metric: str) -> list[str]:
    summary = text[text.index("## Summary"):]
    line = next(line for line in summary.splitlines() if line.startswith(f"| {metric} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_full_run_report_has_every_section_in_order(base_dir):
    full_run(base_dir)
    path = build_report()
    assert path == base_dir / "report" / "report.md"
    text = path.read_text()
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["Environment", "Tokenizer training", "Tokenizer evaluation", "Base model training",
                        "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT",
                        "Chat evaluation sft", "Summary"]
    assert "- vocab_size: 4096" in text and "- chars: 2,000,000" in text
    assert "| news | 1819 | 520 | 3.4980 | 404 | 4.5020 | -28.7000 |" in text
    assert "- parameters: 3,456,789" in text
    assert "- wall clock: 0h10m" in text
    assert "| arc_easy | 0.3500 | 0.0100 | 100 |" in text
    assert "- CORE: 0.0312 (partial: mean of 5 tasks: hellaswag_zeroshot, arc_easy" in text
    assert "- val bpb: 2.0700" in text
    assert "- ChatCORE: 0.0123" in text


def test_summary_table_orders_core_first_chatcore_last(base_dir):
    full_run(base_dir)
    text = build_report().read_text()
    table = text[text.index("| Metric | BASE | MID | SFT | RL |"):].splitlines()
    metrics = [row.split("|")[1].strip() for row in table[2:] if row.startswith("|")]
    assert metrics == ["CORE", *sorted(CHAT_TASKS), "ChatCORE"]
    assert summary_row(text, "CORE") == ["0.0312", "-", "-", "-"]
    assert summary_row(text, "ARC-Easy") == ["-", "0.1000", "0.1200", "-"]
    assert summary_row(text, "ChatCORE") == ["-", "0.0123", "0.0148", "-"]
    # tokenizer 12.5 s + 3 stages x 600 s + evals 120 + 60 + 60 s = 2052.5 s
    assert "Total wall clock time: 0h34m (tokenizer + base + mid + sft + eval base + eval mid + eval sft)" in text


def test_plots_exist_are_valid_pngs_and_are_linked(base_dir):
    full_run(base_dir)
    path = build_report()
    text = path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == ["base_eval.png", "base_loss.png", "chat_eval.png", "mid_loss.png", "sft_loss.png"]
    for link in links:
        assert_valid_png(path.parent / link)


def test_environment_section_names_versions_and_hardware(base_dir):
    text = build_report().read_text()
    env = text[text.index("## Environment"):text.index("## Tokenizer training")]
    for key in ("git commit", "platform", "python", "CPUs", "RAM", "GPUs", "torch", "ray", "deepspeed"):
        assert f"- {key}: " in env
    import torch

    assert f"- torch: {torch.__version__.split('+')[0]}" in env


def test_empty_base_dir_still_gives_a_report_of_dashes(base_dir):
    text = build_report().read_text()
    assert "not run: no tokenizer/tok_train.json" in text
    assert "not run: no checkpoints/base/*/metrics.jsonl" in text
    assert summary_row(text, "CORE") == ["-", "-", "-", "-"]
    assert summary_row(text, "ChatCORE") == ["-", "-", "-", "-"]
    assert "Total wall clock time: -" in text
    assert not list((base_dir / "report").glob("*.png"))


def test_partial_run_killed_during_pretraining(base_dir):
    write_tokenizer(base_dir)
    write_stage(base_dir, "base", "d4", steps=12, finished=False, torn_tail=True)
    path = build_report()
    text = path.read_text()
    assert "- status: incomplete (no summary.json" in text
    assert "- last step: 12" in text  # the torn last record is skipped
    assert "not run: no eval/base/*/results.json" in text
    assert "not run: no checkpoints/mid/*/metrics.jsonl" in text
    assert summary_row(text, "CORE") == ["-", "-", "-", "-"]
    assert "Total wall clock time: 12s (tokenizer)" in text
    assert_valid_png(path.parent / "base_loss.png")
    assert not (path.parent / "mid_loss.png").exists()
    assert not (path.parent / "chat_eval.png").exists()


def test_stale_plots_from_an_earlier_report_are_removed(base_dir):
    full_run(base_dir)
    out = build_report().parent
    assert (out / "chat_eval.png").exists()
    for stage in ("mid", "sft"):
        os.remove(base_dir / "eval" / stage / "d4" / "results.json")
    build_report()
    assert not (out / "chat_eval.png").exists()
    assert (out / "base_eval.png").exists()


def test_latest_tag_is_picked_and_tag_flag_overrides(base_dir, tmp_path):
    full_run(base_dir, tag="d4")
    time.sleep(0.05)
    write_stage(base_dir, "base", "d6", steps=8)
    later = time.time() + 10
    os.utime(base_dir / "checkpoints" / "base" / "d6", (later, later))
    assert latest_tag(base_dir / "checkpoints" / "base") == "d6"
    run = collect()
    assert run.stages["base"].tag == "d6" and run.stages["mid"].tag == "d4"
    assert "base" not in run.eval_tags or run.eval_tags["base"] == "d4"
    text = build_report(tmp_path / "out_d4", tag="d4").read_text()
    assert "- tag: d4" in text and "- tag: d6" not in text
    assert "- last step: 20" in text


def test_cli_report_writes_to_out_dir(base_dir, tmp_path, capsys):
    full_run(base_dir)
    out = tmp_path / "elsewhere"
    assert cli_main(["report", "--out", str(out)]) == 0
    assert (out / "report.md").is_file()
    assert_valid_png(out / "base_loss.png")
    assert str(out / "report.md") in capsys.readouterr().out


@pytest.mark.parametrize(
    "value,expected",
    [(None, "-"), (3, "3"), (12345, "12,345"), (0.123456, "0.1235"), (float("nan"), "-"), ("x", "x"),
     (True, "True")],
)
def test_number_formatting(value, expected):
    assert fmt(value) == expected


def test_duration_formatting():
    assert fmt_duration(None) == "-"
    assert fmt_duration(42) == "42s"
    assert fmt_duration(3 * 3600 + 51 * 60) == "3h51m"


def test_eval_runner_layout_is_read_as_numbers(tmp_path):
    """The eval runner writes CORE as a summary dict and num_examples per task; the report shows numbers."""
    from nanochat.report import normalize_eval_results

    ckpt = tmp_path / "step_000080"
    ckpt.mkdir()
    (ckpt / "meta.json").write_text('{"step": 80}')
    results = {"kind": "base", "checkpoint": str(ckpt),
               "tasks": {"copa": {"accuracy": 0.5, "centered": 0.0, "num_examples": 16}},
               "core": {"core": 0.12, "partial": True, "tasks": ["copa"], "missing": {"winograd": "none"}}}
    flat = normalize_eval_results(results)
    assert flat["core"] == 0.12 and flat["core_partial"] is True and flat["core_tasks"] == ["copa"]
    assert flat["tasks"]["copa"]["n"] == 16 and flat["step"] == 80
