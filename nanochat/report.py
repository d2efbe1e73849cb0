"""The run report: one markdown file (plus PNG plots) that tells the story of a whole run.

It only *reads* artifacts under ``$NANOCHAT_BASE_DIR`` (see the contracts in each stage's module):
``tokenizer/tok_train.json`` and ``tok_eval.json``, ``checkpoints/<stage>/<tag>/metrics.jsonl`` and
``summary.json``, ``eval/<stage>/<tag>/results.json``. Anything missing is shown as ``-`` (a
partial run still gets a report). Sections follow nanochat's report: environment, tokenizer
training and evaluation, base training and evaluation (per-task CORE table), mid-training, SFT,
chat evaluations, a ``Metric | BASE | MID | SFT | RL`` summary and the total wall-clock time.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from nanochat.common import atomic_write_text, base_dir, get_logger

log = get_logger(__name__)

TRAIN_STAGES = ("base", "mid", "sft")
EVAL_STAGES = ("base", "mid", "sft", "rl")
STAGE_TITLES = {"base": "Base model training", "mid": "Midtraining", "sft": "Chat SFT", "rl": "Chat RL"}
# Hourly price per GPU (USD) for the cost estimate, as in nanochat's report.
GPU_HOURLY_USD = {"H100": 3.00, "A100": 1.79, "V100": 0.55}
MISSING = "-"
PLOT_NAMES = ("base_loss", "mid_loss", "sft_loss", "base_eval", "chat_eval")


@dataclass
class StageArtifacts:
    """What one training stage left behind (any part may be missing)."""

    stage: str
    tag: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None


@dataclass
class RunArtifacts:
    """Everything the report reads, gathered once."""

    root: Path
    tok_train: dict[str, Any] | None
    tok_eval: dict[str, Any] | None
    stages: dict[str, StageArtifacts]
    evals: dict[str, dict[str, Any]]  # stage -> results.json
    eval_tags: dict[str, str]


# ---- gathering -----------------------------------------------------------------------------------


def normalize_eval_results(results: dict[str, Any]) -> dict[str, Any]:
    """Accept the eval runner's layout (``core`` as a summary dict, ``num_examples`` per task, the step
    in the checkpoint's meta) as well as the flat report contract (``core`` float, ``core_partial``…)."""
    out = dict(results)
    core = out.get("core")
    if isinstance(core, dict):
        out["core"] = core.get("core")
        out.setdefault("core_partial", core.get("partial"))
        out.setdefault("core_tasks", core.get("tasks"))
    out["tasks"] = {name: {**t, "n": t.get("n", t.get("num_examples"))} for name, t in (out.get("tasks") or {}).items()}
    if out.get("step") is None and out.get("checkpoint"):
        meta = read_json(Path(out["checkpoint"]) / "meta.json")
        out["step"] = (meta or {}).get("step")
    return out


def latest_tag(stage_root: Path) -> str | None:
    """The tag directory under ``stage_root`` touched most recently (None when there is none)."""
    if not stage_root.is_dir():
        return None
    tags = [d for d in stage_root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not tags:
        return None
    return max(tags, key=_newest_mtime).name


def _newest_mtime(directory: Path) -> float:
    times = [directory.stat().st_mtime]
    times += [p.stat().st_mtime for p in directory.iterdir() if not p.name.startswith(".")]
    return max(times)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is missing or unreadable (logged)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("skipping %s: %s", path, err)
        return None
    return data if isinstance(data, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def collect(root: Path | None = None, tag: str | None = None) -> RunArtifacts:
    """Gather the run's artifacts; ``tag`` forces one tag for every stage (default: latest each)."""
    root = Path(root) if root else base_dir()
    stages = {}
    for stage in TRAIN_STAGES:
        stage_root = root / "checkpoints" / stage
        chosen = tag or latest_tag(stage_root)
        art = StageArtifacts(stage, chosen)
        if chosen:
            art.metrics = read_metrics(stage_root / chosen / "metrics.jsonl")
            art.summary = read_json(stage_root / chosen / "summary.json")
        stages[stage] = art
    evals, eval_tags = {}, {}
    for stage in EVAL_STAGES:
        eval_root = root / "eval" / stage
        trained = stages[stage].tag if stage in stages else None
        chosen = tag or (trained if trained and (eval_root / trained).is_dir() else latest_tag(eval_root))
        results = read_json(eval_root / chosen / "results.json") if chosen else None
        if results is not None:
            evals[stage], eval_tags[stage] = normalize_eval_results(results), chosen
    tok_dir = root / "tokenizer"
    return RunArtifacts(root, read_json(tok_dir / "tok_train.json"), read_json(tok_dir / "tok_eval.json"),
                        stages, evals, eval_tags)


# ---- environment ---------------------------------------------------------------------------------


def git_info(start: Path | None = None) -> dict[str, str]:
    """Branch and commit of the source checkout, read from ``.git`` directly (no git binary needed)."""
    here = (start or Path(__file__)).resolve()
    for directory in [here, *here.parents]:
        git = directory / ".git"
        if git.is_file():  # a worktree: "gitdir: <path>"
            text = git.read_text().strip()
            if text.startswith("gitdir:"):
                git = (directory / text.split(":", 1)[1].strip()).resolve()
        if (git / "HEAD").is_file():
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return {"branch": "(detached)", "commit": head[:12]}
            ref = head.split(":", 1)[1].strip()
            commit = _resolve_ref(git, ref)
            return {"branch": ref.removeprefix("refs/heads/"), "commit": commit[:12] if commit else MISSING}
    return {"branch": MISSING, "commit": MISSING}


def _resolve_ref(git: Path, ref: str) -> str | None:
    loose = git / ref
    if loose.is_file():
        return loose.read_text().strip()
    packed = git / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref:
                return parts[0]
    return None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment_info() -> dict[str, Any]:
    """Where the report was generated: code version, hardware, library versions."""
    info: dict[str, Any] = {**{f"git {k}": v for k, v in git_info().items()}}
    info["platform"] = platform.platform()
    info["python"] = platform.python_version()
    info["CPUs"] = os.cpu_count()
    try:
        info["RAM"] = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        info["RAM"] = MISSING
    gpus = _gpus()
    info["GPUs"] = f"{len(gpus)} x {gpus[0]['name']} ({gpus[0]['memory_gib']:.0f} GiB)" if gpus else "none"
    for package in ("torch", "ray", "deepspeed", "nanochat"):
        info[package] = _version(package)
    if gpus:
        rate = next((v for k, v in GPU_HOURLY_USD.items() if k in gpus[0]["name"]), 2.00)
        info["hourly cost estimate"] = f"${rate * len(gpus):.2f}/h ({len(gpus)} GPUs at ${rate:.2f})"
    return info


def _gpus() -> list[dict[str, Any]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        return [
            {"name": torch.cuda.get_device_name(i),
             "memory_gib": torch.cuda.get_device_properties(i).total_memory / 2**30}
            for i in range(torch.cuda.device_count())
        ]
    except Exception:  # noqa: BLE001 - a broken driver must not stop the report
        return []


# ---- formatting ----------------------------------------------------------------------------------


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


# ---- sections ------------------------------------------------------------------------------------


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
    columns = ("base", "mid", "sft", "rl")
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


# ---- plots ---------------------------------------------------------------------------------------


def make_plots(run: RunArtifacts, out_dir: Path) -> dict[str, str]:
    """Write the PNGs (matplotlib, Agg backend) and return ``{name: file name}`` for those written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: dict[str, str] = {}
    for stage, art in run.stages.items():
        if _plot_curves(plt, stage, art.metrics, out_dir / f"{stage}_loss.png"):
            written[f"{stage}_loss"] = f"{stage}_loss.png"
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


# ---- the whole report ----------------------------------------------------------------------------


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


def build_report(out_dir: str | Path | None = None, tag: str | None = None, root: str | Path | None = None) -> Path:
    """Gather artifacts, draw the plots and write ``report.md``; returns its path."""
    run = collect(Path(root) if root else None, tag)
    out = Path(out_dir) if out_dir else run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for stale in PLOT_NAMES:  # a plot from an earlier report must not outlive its data
        (out / f"{stale}.png").unlink(missing_ok=True)
    plots = make_plots(run, out)
    path = out / "report.md"
    atomic_write_text(path, render(run, plots, environment_info()))
    return path


if __name__ == "__main__":  # python -m nanochat.report [OUT_DIR]
    print(build_report(sys.argv[1] if len(sys.argv) > 1 else None))
