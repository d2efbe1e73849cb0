"""The mid-training and SFT conversation mixtures, and the chat-evaluation tasks.

``stage_tasks(stage, settings)`` returns ``(train, val)`` tasks for ``stage`` in ``mid``/``sft``
from a preset's ``mixture`` section; ``chat_eval_task(name)`` the evaluation split of a chat task.
Training always draws from the train side of every dataset and evaluation from the other side
(see docs/conversation-data.md for the split table); validation loss uses the eval side too, as
the reference does, but never for gradient steps. ``base`` (every function here) is the artifacts root
whose ``task_data/`` caches the hub downloads of ``source="hub"`` (default ``$NANOCHAT_BASE_DIR``).
"""

from __future__ import annotations

from os import PathLike
from typing import Literal

from nanochat.common import NanochatError
from nanochat.config import MixturePart, MixtureSettings
from nanochat.tasks.arc import ARC
from nanochat.tasks.base import Task, TaskMixture
from nanochat.tasks.chatterbot import ChatterbotCorpus
from nanochat.tasks.gsm8k import GSM8K
from nanochat.tasks.humaneval import HumanEval
from nanochat.tasks.identity import Identity, IdentityJSONL
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.spelling import SimpleSpelling, SpellingBee

Source = Literal["builtin", "hub"]
Base = str | PathLike | None
IDENTITY_SIZE = 500
SPELLING_BEE_TEST = 256
CHAT_EVAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")


def _cap(rows: int) -> int | None:
    return None if rows < 0 else rows


def _chat_task(source: Source, split: str, rows: int, base: Base) -> Task:
    if source == "hub":
        from nanochat.tasks.smoltalk import SmolTalk

        return SmolTalk(split, base=base, stop=_cap(rows))
    return ChatterbotCorpus(split, stop=_cap(rows))  # type: ignore[arg-type]


def _identity_task(source: Source, base: Base) -> Task:
    if source == "hub":
        from nanochat.sources.hub import download_identity

        return IdentityJSONL(download_identity(base))
    return Identity(IDENTITY_SIZE)


def train_tasks(part: MixturePart, source: Source, base: Base = None) -> list[Task]:
    """The train-side tasks of one stage; a task repeated ``k`` times is ``k`` epochs of it."""
    tasks: list[Task] = []
    if part.chat:
        tasks.append(_chat_task(source, "train", part.chat, base))
    if part.mmlu:
        tasks.append(MMLU("train", source, base=base, stop=_cap(part.mmlu)))
    if part.arc:
        tasks += [ARC(subset, "train", source, base=base, stop=_cap(part.arc))
                  for subset in ("ARC-Easy", "ARC-Challenge")]
    if part.gsm8k:
        tasks.append(GSM8K("train", source, base=base, stop=_cap(part.gsm8k)))
    if part.identity_epochs:
        identity = _identity_task(source, base)
        tasks += [identity] * part.identity_epochs
    if part.simple_spelling:
        tasks.append(SimpleSpelling(part.simple_spelling, "train"))
    if part.spelling_bee:
        tasks.append(SpellingBee(part.spelling_bee, "train"))
    if not tasks:
        raise NanochatError("the mixture is empty: set at least one of mixture.<stage>.{chat,mmlu,arc,gsm8k,...}")
    return tasks


def val_tasks(stage: str, source: Source, base: Base = None) -> list[Task]:
    """Eval-side tasks for the validation loss (reference: SmolTalk test + MMLU test + GSM8K test)."""
    tasks: list[Task] = [_chat_task(source, "test", -1, base)]
    if stage == "mid":
        tasks += [MMLU("test", source, base=base, stop=5200), GSM8K("test", source, base=base, stop=420)]
    elif source == "builtin":  # SFT: the reference validates on SmolTalk test alone; offline it is tiny
        tasks += [ARC("ARC-Easy", "test", source, stop=500), GSM8K("test", source, stop=200)]
    return tasks


def stage_tasks(stage: Literal["mid", "sft"], settings: MixtureSettings,
                base: Base = None) -> tuple[TaskMixture, TaskMixture]:
    """``(train, val)`` mixtures for a stage, shuffled with ``settings.seed``; val capped at ``val_max``."""
    if stage not in ("mid", "sft"):
        raise NanochatError(f"stage must be 'mid' or 'sft', got {stage!r}")
    part = settings.mid if stage == "mid" else settings.sft
    train = TaskMixture(train_tasks(part, settings.source, base), seed=settings.seed)
    val = TaskMixture(val_tasks(stage, settings.source, base), seed=settings.seed, stop=_cap(settings.val_max))
    return train, val


def chat_eval_task(name: str, source: Source = "builtin", base: Base = None) -> Task:
    """The evaluation split of a chat task: ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee."""
    key = name.lower().replace("_", "-")
    if key in ("arc-easy", "arc-challenge"):
        return ARC("ARC-Easy" if key == "arc-easy" else "ARC-Challenge", "test", source, base=base)
    if key == "mmlu":
        return MMLU("test", source, base=base)
    if key == "gsm8k":
        return GSM8K("test", source, base=base)
    if key == "humaneval":
        return HumanEval()
    if key == "spellingbee":
        return SpellingBee(SPELLING_BEE_TEST, "test")
    raise NanochatError(f"unknown chat task {name!r}; choose from {', '.join(CHAT_EVAL_TASKS)}")
