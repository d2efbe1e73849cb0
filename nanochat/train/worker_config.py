"""What the driver hands each training worker: one typed :class:`WorkerConfig`.

It travels as Ray Train's ``train_loop_config``, which Ray 2.60 types as a plain dict (it pickles it
to the workers and shows it, made JSON-safe, in its run state). So the driver sends
:meth:`WorkerConfig.to_loop_config` (the JSON form) and the worker rebuilds it with
:meth:`WorkerConfig.from_loop_config`, validated on both ends. Functions (the SFT in-loop
evaluator) travel as their import path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ImportString

from nanochat.config import TrainSettings
from nanochat.model import GPTConfig
from nanochat.train.killpoints import KillPoint

# (model, tokenizer, device, problems, task source, artifacts root) -> {"mmlu_acc": ..., ...}: see
# nanochat.eval.chat_eval.letter_accuracy
ChatEvaluator = Callable[..., dict[str, float]]


class WorkerConfig(BaseModel):
    """One stage's run, as every worker of it needs to know it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Literal["base", "mid", "sft"]  # checkpoint stage (nanochat.stages)
    tag: str
    settings: TrainSettings
    gpt: GPTConfig
    sequence_len: int  # rows of the datasets (the preset's; may differ from the source checkpoint's)
    num_iterations: int
    tokenizer_dir: str
    base_dir: str  # the driver's artifacts root: workers take paths from here, never from the environment
    task_source: str = "builtin"  # where SFT's in-loop evaluator reads its questions
    init_checkpoint: str | None = None  # mid/SFT: the checkpoint whose weights the model starts from
    dtype: Literal["auto-gpu", "bfloat16", "float32"] = "float32"  # resolved by the driver
    threads_per_worker: int = 1  # torch threads of a CPU worker
    stop_at_step: int | None = None  # checkpoint and stop there (rerun to resume)
    dataset_skip_rows: int = 0  # global rows the driver's train dataset already starts past
    debug_pid_dir: str | None = None  # test seam: each rank writes rank_<r>.pid there
    kill_at: KillPoint | None = None  # test seam, see nanochat.train.killpoints
    chat_evaluator: ImportString[ChatEvaluator] | None = None  # SFT letter accuracy (chat_eval_problems > 0)

    def to_loop_config(self) -> dict[str, Any]:
        """The JSON-safe dict for ``TorchTrainer(train_loop_config=...)``."""
        return self.model_dump(mode="json")

    @classmethod
    def from_loop_config(cls, config: dict[str, Any]) -> WorkerConfig:
        return cls.model_validate(config)
