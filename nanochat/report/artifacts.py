"""Gathering a run's artifacts for the report: one :class:`RunArtifacts`, read once.

It only *reads* files under the artifacts root (``$NANOCHAT_BASE_DIR`` by default), as each stage's
module writes them: ``tokenizer/tok_train.json`` and ``tok_eval.json``,
``checkpoints/<stage>/<tag>/metrics.jsonl`` and ``summary.json``, ``eval/<stage>/<tag>/results.json``.
Anything missing or unreadable comes back as ``None`` / empty (a partial run still gets a report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanochat.common import base_dir, get_logger
from nanochat.stages import CHECKPOINT_STAGES as TRAIN_STAGES

log = get_logger(__name__)

EVAL_STAGES = tuple(dict.fromkeys((*TRAIN_STAGES, "rl")))  # rl is a checkpoint stage too


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
    root = base_dir(root)
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
