"""The report's markdown: number style, tables and one section per stage.

Sections follow nanochat's report: environment, tokenizer training and evaluation, base training and
evaluation (per-task CORE table), mid-training, SFT, chat evaluations, a ``Metric | BASE | MID | SFT |
RL`` summary and the total wall-clock time. A missing value is shown as ``-``.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from nanochat.report.artifacts import EVAL_STAGES, RunArtifacts, StageArtifacts
from nanochat.stages import STAGES

STAGE_TITLES = {**{s.checkpoint: s.title for s in STAGES}, "rl": "Chat RL"}
MISSING = "-"


def fmt(value: Any) -> str:
    """Report number style: floats with 4 decimals, ints >= 10,000 with thousands separators."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return MISSING
        return f"{value:,.0f}" if abs(value) >= 1e6 else f"{value:.4f}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60}m" if seconds >= 60 else f"{seconds:.0f}s"


def kv_lines(items: dict[str, Any]) -> list[str]:
    return [f"- {key}: {fmt(value)}" for key, value in items.items()]


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return lines


def tokenizer_sections(run: RunArtifacts) -> list[str]:
    lines = ["## Tokenizer training", ""]
    if run.tok_train:
        keys = ("vocab_size", "chars", "documents", "seconds", "source", "max_chars", "doc_cap")
        lines += kv_lines({k: run.tok_train.get(k) for k in keys if k in run.tok_train})
    else:
        lines.append(f"{MISSING} (not run: no tokenizer/tok_train.json)")
    lines += ["", "## Tokenizer evaluation", ""]
    rows = (run.tok_eval or {}).get("rows") or []
    if not rows:
        lines.append(f"{MISSING} (not run: no tokenizer/tok_eval.json)")
        return lines
    baselines = [b for b in (run.tok_eval or {}).get("baselines", {}) if any(r.get(b) for r in rows)]
    header = ["Text", "Bytes", "Tokens", "Bytes/token"]
    for b in baselines:
        header += [f"{b} tokens", f"{b} bytes/token", f"vs {b} (%)"]
    body = []
    for r in rows:
        ours = r.get("ours") or {}
        row = [r.get("text"), r.get("bytes"), ours.get("tokens"), ours.get("ratio")]
        for b in baselines:
            other = r.get(b) or {}
            row += [other.get("tokens"), other.get("ratio"), other.get("diff_pct")]
        body.append(row)
    return lines + table(header, body)


def curve_stats(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Headline numbers from a metrics.jsonl: last loss, best val numbers, throughput."""

    def values(key: str) -> list[float]:
        return [float(m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]

    out: dict[str, Any] = {"log records": len(metrics)}
    steps = values("step")
    out["last step"] = int(max(steps)) if steps else None
    out["final train loss"] = (values("train/loss") or [None])[-1]
    for key in ("val/bpb", "val/loss"):
        vals = values(key)
        if vals:
            out[f"min {key}"] = min(vals)
    tps = values("train/tok_per_sec")
    out["tokens/s (last)"] = tps[-1] if tps else None
    mfu = values("train/mfu")
    out["MFU % (last)"] = 100 * mfu[-1] if mfu else None
    seen = values("tokens_seen")
    if seen:
        out["tokens seen"] = int(seen[-1])
    return out


def training_section(art: StageArtifacts, plot: str | None) -> list[str]:
    lines = [f"## {STAGE_TITLES[art.stage]}", ""]
    if not art.summary and not art.metrics:
        return lines + [f"{MISSING} (not run: no checkpoints/{art.stage}/*/metrics.jsonl)"]
    lines.append(f"- tag: {art.tag}")
    if art.summary:
        s = art.summary
        lines += kv_lines({
            "parameters": s.get("num_params"),
            "iterations": s.get("num_iterations"),
            "wall clock": fmt_duration(_wall_seconds(s)),
            "checkpoint": s.get("checkpoint"),
            "started from": s.get("source_checkpoint"),
        })
    else:
        lines.append("- status: incomplete (no summary.json: the stage did not finish)")
    lines += kv_lines(curve_stats(art.metrics))
    if plot:
        lines += ["", f"![{art.stage} loss curves]({plot})"]
    return lines


def rl_lines(metrics: list[dict[str, Any]], plot: str | None) -> list[str]:
    """The RL stage's headline numbers (first and last held-out evaluation, last train reward) and its curve."""
    evals = [m for m in metrics if isinstance(m.get("eval/pass@1"), (int, float))]
    train = [m for m in metrics if isinstance(m.get("reward/mean"), (int, float))]
    out = kv_lines({
        "held-out pass@1 (first → last)": f"{fmt(evals[0]['eval/pass@1'])} → {fmt(evals[-1]['eval/pass@1'])}"
        if evals else None,
        "held-out mean reward (first → last)": f"{fmt(evals[0].get('eval/reward_mean'))} → "
        f"{fmt(evals[-1].get('eval/reward_mean'))}" if evals else None,
        "train mean reward (last step)": train[-1]["reward/mean"] if train else None,
        "weights version": (metrics[-1].get("weights_version") if metrics else None),
    })
    return out + (["", f"![rl reward]({plot})"] if plot else [])


def base_eval_section(results: dict[str, Any] | None, plot: str | None) -> list[str]:
    lines = ["## Base model evaluation", ""]
    if not results:
        return lines + [f"{MISSING} (not run: no eval/base/*/results.json)"]
    bpb = results.get("bpb") or {}
    core = results.get("core")
    label = fmt(core)
    if core is not None and results.get("core_partial"):
        tasks = results.get("core_tasks") or []
        label += f" (partial: mean of {len(tasks)} tasks: {', '.join(tasks)})"
    lines += kv_lines({"checkpoint": results.get("checkpoint"), "step": results.get("step"),
                       "train bpb": bpb.get("train"), "val bpb": bpb.get("val")})
    lines.append(f"- CORE: {label}")
    tasks = results.get("tasks") or {}
    if tasks:
        lines += [""] + table(["Task", "Accuracy", "Centered", "N"],
                              [[name, t.get("accuracy"), t.get("centered"), t.get("n")] for name, t in tasks.items()])
    if plot:
        lines += ["", f"![CORE per task]({plot})"]
    return lines


def chat_eval_section(stage: str, results: dict[str, Any] | None) -> list[str]:
    lines = [f"## Chat evaluation {stage}", ""]
    if not results:
        return lines + [f"{MISSING} (not run: no eval/{stage}/*/results.json)"]
    lines += kv_lines({"checkpoint": results.get("checkpoint"), "step": results.get("step")})
    tasks = results.get("tasks") or {}
    if tasks:
        lines += [""] + table(["Task", "Accuracy", "Centered", "N"],
                              [[name, t.get("accuracy"), t.get("centered"), t.get("n")] for name, t in tasks.items()])
    lines += ["", f"- ChatCORE: {fmt(results.get('chatcore'))}"]
    return lines


def is_chat(stage: str, results: dict[str, Any]) -> bool:
    """Chat-eval results (ARC/MMLU/GSM8K/...) as opposed to base-model CORE results."""
    return results.get("kind", "base" if stage == "base" else "chat") == "chat"


def summary_rows(run: RunArtifacts) -> list[list[Any]]:
    """Rows of the summary table: CORE first, ChatCORE last, chat tasks alphabetical between."""
    columns = EVAL_STAGES
    chat = {stage: r for stage, r in run.evals.items() if is_chat(stage, r)}
    names = sorted({name for r in chat.values() for name in (r.get("tasks") or {})})
    rows = [["CORE", *[run.evals.get(c, {}).get("core") for c in columns]]]
    for name in names:
        rows.append([name, *[((chat.get(c) or {}).get("tasks") or {}).get(name, {}).get("accuracy") for c in columns]])
    rows.append(["ChatCORE", *[(chat.get(c) or {}).get("chatcore") for c in columns]])
    return rows


def _wall_seconds(record: dict[str, Any] | None) -> float | None:
    if not record:
        return None
    for key in ("wall_seconds", "wall_clock_seconds", "seconds", "elapsed_seconds"):
        if isinstance(record.get(key), (int, float)):
            return float(record[key])
    return None


def total_wall_clock(run: RunArtifacts) -> tuple[float | None, list[str]]:
    """Sum of the recorded times of every stage that ran, and which stages contributed."""
    parts = {"tokenizer": _wall_seconds(run.tok_train)}
    parts.update({stage: _wall_seconds(art.summary) for stage, art in run.stages.items()})
    parts.update({f"eval {stage}": _wall_seconds(r) for stage, r in run.evals.items()})
    counted = {k: v for k, v in parts.items() if v is not None}
    return (sum(counted.values()) if counted else None), list(counted)


def render(run: RunArtifacts, plots: dict[str, str], env: dict[str, Any]) -> str:
    """The markdown text of the report."""
    now = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = ["# nanochat training report", "", f"Generated: {now}", f"Artifacts: `{run.root}`", "",
             "## Environment", ""]
    lines += kv_lines(env)
    lines += [""] + tokenizer_sections(run)
    lines += [""] + training_section(run.stages["base"], plots.get("base_loss"))
    lines += [""] + base_eval_section(run.evals.get("base"), plots.get("base_eval"))
    lines += [""] + training_section(run.stages["mid"], plots.get("mid_loss"))
    lines += [""] + chat_eval_section("mid", run.evals.get("mid"))
    lines += [""] + training_section(run.stages["sft"], plots.get("sft_loss"))
    lines += [""] + chat_eval_section("sft", run.evals.get("sft"))
    rl = run.stages.get("rl")
    if rl is not None and (rl.metrics or rl.summary):
        lines += [""] + training_section(rl, None) + rl_lines(rl.metrics, plots.get("rl_reward"))
    if "rl" in run.evals:
        lines += [""] + chat_eval_section("rl", run.evals.get("rl"))
    lines += ["", "## Summary", ""]
    lines += table(["Metric", "BASE", "MID", "SFT", "RL"], summary_rows(run))
    if plots.get("chat_eval"):
        lines += ["", f"![Chat evaluations]({plots['chat_eval']})"]
    total, counted = total_wall_clock(run)
    lines += ["", f"Total wall clock time: {fmt_duration(total)}"
              + (f" ({' + '.join(counted)})" if counted else "")]
    return "\n".join(lines) + "\n"
