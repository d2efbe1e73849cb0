"""The training stages: their names, their checkpoint names, and which stage feeds which.

A stage has two names: the command and preset section (``pretrain``, ``midtrain``, ``sft``) and
the checkpoint stage it writes (``base``, ``mid``, ``sft``: ``checkpoints/<stage>/<tag>/step_N``
and ``meta.json``'s ``stage``). Midtraining starts from a base checkpoint, SFT from a mid one.
Reinforcement learning (``rl``, :data:`RL`) starts from an SFT checkpoint; its learner runs on Ray
Train + DeepSpeed with its own per-worker loop (rollouts, not a dataset: :mod:`nanochat.rl`), so it
is in :data:`CHECKPOINT_STAGES` but not in :data:`STAGES`.
This module imports nothing (no torch), so ``nanochat --help`` can list the stages cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # command and preset section: pretrain | midtrain | sft | rl
    checkpoint: str  # checkpoint stage: base | mid | sft | rl
    source: str | None  # checkpoint stage it starts from (None: from scratch)
    help: str  # one line for `nanochat train --help`
    title: str  # its section heading in the run report

    @property
    def command(self) -> str:
        """The command that produces this stage's checkpoints (named in error messages)."""
        return f"nanochat train {self.name}"


STAGES: tuple[Stage, ...] = (
    Stage("pretrain", "base", None, "pretrain the base model on the parquet shards", "Base model training"),
    Stage("midtrain", "mid", "base", "mid-train a base checkpoint on the conversation mixture", "Midtraining"),
    Stage("sft", "sft", "mid", "supervised fine-tuning of a mid checkpoint", "Chat SFT"),
)
TRAIN_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES)
RL = Stage("rl", "rl", "sft", "reinforcement learning of an SFT checkpoint (rollout actors + learner)", "Chat RL")
CHECKPOINT_STAGES: tuple[str, ...] = (*(s.checkpoint for s in STAGES), RL.checkpoint)


def get_stage(name: str) -> Stage:
    """The stage named ``name``: a training name (``midtrain``) or a checkpoint name (``mid``).

    Raises:
        ValueError: no stage has that name; the message lists the allowed ones.
    """
    for stage in (*STAGES, RL):
        if name in (stage.name, stage.checkpoint):
            return stage
    raise ValueError(f"unknown stage {name!r}: choose one of {', '.join((*TRAIN_STAGES, RL.name))}")
