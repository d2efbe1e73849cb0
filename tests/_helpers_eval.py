"""Shared pieces for the evaluation tests: a real tiny checkpoint and a tiny CORE bundle."""

from __future__ import annotations

import json
from pathlib import Path

from nanochat.eval.core import CoreTask
from nanochat.eval.core_data import write_bundle_config

TINY_TASKS = [
    CoreTask("copa", "multiple_choice", 0, 50.0, "commonsense_reasoning/copa.jsonl"),
    CoreTask("winogrande", "schema", 0, 50.0, "language_understanding/winogrande.jsonl"),
    CoreTask("bigbench_operators", "language_modeling", 2, 0.0, "symbolic_problem_solving/bigbench_operators.jsonl"),
]


def tiny_items(task: CoreTask, n: int = 6) -> list[dict]:
    if task.task_type == "multiple_choice":
        return [{"query": f"The fox {i} jumps, therefore", "choices": ["the dog slept.", "the quick fox ran."],
                 "gold": i % 2} for i in range(n)]
    if task.task_type == "schema":
        return [{"context_options": [f"The quick fox {i}", f"The lazy dog {i}"], "continuation": "jumps over.",
                 "gold": i % 2} for i in range(n)]
    return [{"context": f"op {i} =", "continuation": str(i)} for i in range(n)]


def write_tiny_bundle(dest: Path, tasks: list[CoreTask] = TINY_TASKS, n: int = 6) -> Path:
    for t in tasks:
        path = dest / "eval_data" / t.dataset_uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(i) + "\n" for i in tiny_items(t, n)))
    write_bundle_config(dest, list(tasks))
    (dest / "missing.json").write_text(json.dumps({"winograd": "no registry package provides this task"}))
    return dest


def save_tiny_checkpoint(model_factory, tokenizer, base: Path, stage: str = "base") -> Path:
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint

    model = model_factory(seed=0)
    return save_checkpoint(checkpoint_dir(stage, "d2", 1), model, model.config, tokenizer, stage=stage, step=1)
