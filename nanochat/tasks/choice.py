"""Multiple-choice rendering shared by ARC and MMLU (the reference prompt format).

User: ``Multiple Choice question: {q}\\n`` + ``- {choice}={letter}\\n`` per option +
``\\nRespond only with the letter of the correct answer.``; assistant: the bare letter, so it is
the same token as in the prompt. ``letters`` lists the valid answers for categorical scoring.
"""

from __future__ import annotations

from typing import Any

from nanochat.tasks.base import ConversationDict, ListTask

LETTERS = "ABCDEFGHIJ"


def render_multiple_choice(question: str, choices: list[str]) -> str:
    lines = [f"Multiple Choice question: {question}\n"]
    lines += [f"- {choice}={letter}\n" for letter, choice in zip(LETTERS, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "".join(lines)


def multiple_choice_conversation(question: str, choices: list[str], answer: int, **fields: Any) -> ConversationDict:
    """A one-turn conversation asking ``question`` with lettered ``choices``; gold = ``answer``."""
    if not 0 <= answer < len(choices) <= len(LETTERS):
        raise ValueError(f"answer index {answer} out of range for {len(choices)} choices")
    letters = list(LETTERS[: len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_multiple_choice(question, choices)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "letters": letters,
        **fields,
    }


class MultipleChoiceTask(ListTask):
    """Rows of lettered questions. Categorical: the completion (the argmax letter) must equal the gold letter."""

    eval_type = "categorical"

    def evaluate(self, conversation: ConversationDict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
