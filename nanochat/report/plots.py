"""The report's PNG plots (matplotlib, Agg backend): loss curves per stage, CORE per task, chat evals."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from nanochat.report.artifacts import RunArtifacts
from nanochat.report.markdown import fmt, is_chat

PLOT_NAMES = ("base_loss", "mid_loss", "sft_loss", "rl_reward", "base_eval", "chat_eval")


def make_plots(run: RunArtifacts, out_dir: Path) -> dict[str, str]:
    """Write the PNGs (matplotlib, Agg backend) and return ``{name: file name}`` for those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    for stage, art in run.stages.items():
        if _plot_curves(plt, stage, art.metrics, out_dir / f"{stage}_loss.png"):
            written[f"{stage}_loss"] = f"{stage}_loss.png"
    rl = run.stages.get("rl")
    if rl is not None and _plot_reward(plt, rl.metrics, out_dir / "rl_reward.png"):
        written["rl_reward"] = "rl_reward.png"
    base = run.evals.get("base")
    if base and base.get("tasks"):
        names = list(base["tasks"])
        centered = [float(base["tasks"][n].get("centered") or 0.0) for n in names]
        fig, ax = plt.subplots(figsize=(8, 0.3 * len(names) + 1.5))
        ax.barh(names, centered, color="tab:blue")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("centered accuracy")
        ax.set_title(f"CORE per task (CORE = {fmt(base.get('core'))})")
        _save(plt, fig, out_dir / "base_eval.png")
        written["base_eval"] = "base_eval.png"
    chat = {s: r for s, r in run.evals.items() if is_chat(s, r) and r.get("tasks")}
    if chat:
        names = sorted({n for r in chat.values() for n in r["tasks"]})
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
        width = 0.8 / len(chat)
        for i, (stage, r) in enumerate(chat.items()):
            accs = [float((r["tasks"].get(n) or {}).get("accuracy") or 0.0) for n in names]
            ax.bar([j + i * width for j in range(len(names))], accs, width, label=stage.upper())
        ax.set_xticks([j + width * (len(chat) - 1) / 2 for j in range(len(names))], names, rotation=20)
        ax.set_ylabel("accuracy")
        ax.set_title("Chat evaluations")
        ax.legend()
        _save(plt, fig, out_dir / "chat_eval.png")
        written["chat_eval"] = "chat_eval.png"
    return written


def _plot_reward(plt: Any, metrics: list[dict[str, Any]], path: Path) -> bool:
    """The RL stage's reward curve: train mean reward per step, held-out pass@1 and mean reward."""
    curves = {key: _series(metrics, key) for key in ("reward/mean", "eval/pass@1", "eval/reward_mean")}
    if not any(xs for xs, _ in curves.values()):
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("reward/mean", "-"), ("eval/pass@1", "o-"), ("eval/reward_mean", "s--")):
        xs, ys = curves[key]
        if xs:
            ax.plot(xs, ys, style, label=key, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("rl: reward")
    ax.legend()
    _save(plt, fig, path)
    return True


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(m["step"]), float(m[key])) for m in metrics
           if isinstance(m.get("step"), (int, float)) and isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot_curves(plt: Any, stage: str, metrics: list[dict[str, Any]], path: Path) -> bool:
    curves = {key: _series(metrics, key) for key in ("train/loss", "val/loss", "val/bpb")}
    if not any(xs for xs, _ in curves.values()):
        return False
    has_bpb = bool(curves["val/bpb"][0])
    fig, axes = plt.subplots(1, 2 if has_bpb else 1, figsize=(11 if has_bpb else 6, 4), squeeze=False)
    loss_ax = axes[0][0]
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        xs, ys = curves[key]
        if xs:
            loss_ax.plot(xs, ys, style, label=key, markersize=3)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.set_title(f"{stage}: loss")
    loss_ax.legend()
    if has_bpb:
        xs, ys = curves["val/bpb"]
        axes[0][1].plot(xs, ys, "o-", color="tab:green", markersize=3)
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("bits per byte")
        axes[0][1].set_title(f"{stage}: validation bpb")
    _save(plt, fig, path)
    return True


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
