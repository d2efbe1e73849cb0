"""Conversation tasks: chat data sources, multiple-choice and generative evals, mixtures."""

from nanochat.tasks.base import ListTask, Task, TaskMixture, TaskSequence
from nanochat.tasks.mixtures import CHAT_EVAL_TASKS, chat_eval_task, stage_tasks

__all__ = ["CHAT_EVAL_TASKS", "ListTask", "Task", "TaskMixture", "TaskSequence", "chat_eval_task", "stage_tasks"]
