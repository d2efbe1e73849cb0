"""The main job: every stage of a model's life, in order, as one resumable run.

Each stage records its completion in ``<base>/runs/<preset>/stages.json``; a rerun skips finished
stages and resumes at the first unfinished one (training stages also resume from their own latest
checkpoint). ``from_stage`` reruns that stage and everything after it; ``force`` reruns all. ``base``,
the artifacts root, is resolved once by :func:`run_pipeline` (default ``$NANOCHAT_BASE_DIR``) and
passed to every stage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path

from nanochat.common import NanochatError, atomic_write_text, base_dir, get_logger
from nanochat.config import Preset

log = get_logger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    run: Callable[[Preset, str, bool, Path], dict | None]  # (preset, tag, fresh, base)


def _prepare_data(preset: Preset, tag: str, fresh: bool, base: Path) -> dict:
    from nanochat.sources.pretrain import prepare

    data = preset.data
    return {"data_dir": str(prepare(data.source, data.num_shards, seed=data.seed, base=base))}


def _train_tokenizer(preset: Preset, tag: str, fresh: bool, base: Path) -> dict:
    from nanochat.tokenizer_train import train_tokenizer

    return _as_dict(train_tokenizer(preset, base=base))


def _eval_tokenizer(preset: Preset, tag: str, fresh: bool, base: Path) -> dict:
    from nanochat.tokenizer_eval import evaluate_tokenizer

    return _as_dict(evaluate_tokenizer(base=base))


def _train(stage: str) -> Callable[[Preset, str, bool, Path], dict]:
    def run(preset: Preset, tag: str, fresh: bool, base: Path) -> dict:
        from nanochat.eval.chat_eval import letter_accuracy
        from nanochat.train.trainer import train_stage

        # A stage rerun on request starts over; an unfinished one resumes from its latest checkpoint.
        return _as_dict(train_stage(stage, preset, tag=tag, restart=fresh, chat_evaluator=letter_accuracy, base=base))

    return run


def _base_eval(preset: Preset, tag: str, fresh: bool, base: Path) -> dict:
    from nanochat.checkpoint import find_latest
    from nanochat.eval.runner import run_base_eval

    ev = preset.eval
    out = run_base_eval(find_latest("base", tag, base), max_per_task=ev.core_max_per_task, num_actors=ev.num_actors,
                        bpb_source=preset.data.source, bpb_tokens=preset.pretrain.eval_tokens, base=base)
    return {"core": out["core"].get("core"), "core_label": out["core"].get("label"), "bpb": out.get("bpb")}


def _rl(preset: Preset, tag: str, fresh: bool, base: Path) -> dict:
    from nanochat.rl.run import train_rl

    return _as_dict(train_rl(preset, tag=tag, restart=fresh, base=base))


def _chat_eval(preset: Preset, tag: str, fresh: bool, base: Path, stage: str = "sft") -> dict:
    from nanochat.checkpoint import find_latest
    from nanochat.eval.runner import run_chat_eval

    ev = preset.eval
    out = run_chat_eval(find_latest(stage, tag, base), max_problems=ev.chat_max_problems, num_actors=ev.num_actors,
                        max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, source=preset.mixture.source,
                        base=base)
    return {"chatcore": out.get("chatcore"), "tasks": {k: v["accuracy"] for k, v in out["tasks"].items()}}


def _report(preset: Preset, tag: str, fresh: bool, base: Path) -> dict:
    from nanochat.report import build_report

    return {"report": str(build_report(root=base))}


STAGES: list[Stage] = [
    Stage("data", "prepare pretraining shards", _prepare_data),
    Stage("tokenizer", "train the BPE tokenizer", _train_tokenizer),
    Stage("tok_eval", "tokenizer compression table", _eval_tokenizer),
    Stage("pretrain", "pretrain the base model", _train("pretrain")),
    Stage("base_eval", "CORE + bpb of the base model", _base_eval),
    Stage("midtrain", "mid-train on conversations", _train("midtrain")),
    Stage("sft", "supervised fine-tuning", _train("sft")),
    Stage("chat_eval", "chat evaluations of the SFT model", _chat_eval),
    Stage("rl", "reinforcement learning of the SFT model", _rl),
    Stage("rl_eval", "chat evaluations of the RL model", lambda p, t, fresh, b: _chat_eval(p, t, fresh, b, "rl")),
    Stage("report", "build report.md", _report),
]
STAGE_NAMES = [s.name for s in STAGES]


def _as_dict(value: object) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if _jsonable(v)}
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if hasattr(value, "__dict__"):
        return {k: v for k, v in vars(value).items() if _jsonable(v)}
    return {"result": str(value)}


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


class RunState:
    """Completion records of one run's stages, persisted atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict] = json.loads(path.read_text())["stages"] if path.exists() else {}

    def done(self, name: str) -> bool:
        return self.stages.get(name, {}).get("status") == "done"

    def mark(self, name: str, status: str, **info) -> None:
        self.stages[name] = {"status": status, "at": datetime.now(UTC).isoformat(timespec="seconds"), **info}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"stages": self.stages}, indent=2))

    def reset(self, names: list[str]) -> None:
        for name in names:
            self.stages.pop(name, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"stages": self.stages}, indent=2))


def run_state_path(preset: Preset, base: str | PathLike | None = None) -> Path:
    return base_dir(base) / "runs" / preset.name / "stages.json"


def run_pipeline(
    preset: Preset,
    from_stage: str | None = None,
    force: bool = False,
    stop_after: str | None = None,
    base: str | PathLike | None = None,
) -> RunState:
    """Run every unfinished stage in order under the artifacts root ``base`` (default
    ``$NANOCHAT_BASE_DIR``); returns the run's state (which stages are done)."""
    for name in (from_stage, stop_after):
        if name is not None and name not in STAGE_NAMES:
            raise NanochatError(f"unknown stage '{name}': choose one of {STAGE_NAMES}")
    base = base_dir(base)
    state = RunState(run_state_path(preset, base))
    rerun = STAGE_NAMES if force else STAGE_NAMES[STAGE_NAMES.index(from_stage) :] if from_stage else []
    state.reset(rerun)
    tag = f"d{preset.model.depth}"
    total = len(STAGES)
    for i, stage in enumerate(STAGES, 1):
        if state.done(stage.name):
            log.info("[%d/%d] %-9s done already (skipping; --from-stage %s reruns it)", i, total, stage.name, stage.name)
        else:
            log.info("[%d/%d] %-9s %s", i, total, stage.name, stage.description)
            state.mark(stage.name, "running")
            t0 = time.time()
            try:
                info = stage.run(preset, tag, stage.name in rerun, base) or {}
            except BaseException as exc:
                state.mark(stage.name, "failed", error=f"{type(exc).__name__}: {exc}", seconds=round(time.time() - t0, 1))
                raise
            state.mark(stage.name, "done", seconds=round(time.time() - t0, 1), **{"result": info})
            log.info("[%d/%d] %-9s finished in %.0fs", i, total, stage.name, time.time() - t0)
        if stop_after == stage.name:
            break
    return state
