"""Synthetic spelling tasks (no download): SimpleSpelling and SpellingBee.

* SimpleSpelling: ``Spell the word: strawberry`` -> ``strawberry:s,t,r,a,w,b,e,r,r,y``.
* SpellingBee: "how many <letter> in <word>?" answered by spelling the word with a running
  count, then checking with a python tool call ``'word'.count('x')`` (its output part is written
  by the tool at inference time) and ending with ``#### <n>``.

Examples are generated from ``random.Random`` seeded by (split, index), so any index is cheap and
always the same. Words come from the chatterbot-corpus text (lowercase, 3-12 letters).
"""

from __future__ import annotations

import functools
import random
import re
from typing import Literal

from nanochat.common import NanochatError
from nanochat.sources import registry
from nanochat.tasks.base import ConversationDict, Task, extract_hash_answer, last_text

SPLIT_SEED = {"train": 0, "test": 1 << 30}
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
QUESTIONS = [
    "How many {l} are in {w}?",
    "How many times does the letter '{l}' appear in '{w}'?",
    "Count the letter {l} in the word {w}.",
    "In the word \"{w}\", how many {l}'s are there?",
    "how many {l}s in {w}",
    "Could you count how often '{l}' occurs in {w}?",
    "What is the number of '{l}' letters in \"{w}\"?",
    "Tell me how many times {l} shows up in {w}.",
]


@functools.lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """Distinct lowercase alphabetic words (3-12 letters) of the chatterbot corpus, sorted."""
    words: set[str] = set()
    for row in registry.read_chatterbot():
        for turn in row["turns"]:
            words.update(w.lower() for w in re.findall(r"\b[A-Za-z]{3,12}\b", turn))
    return tuple(sorted(words))


class _SeededTask(Task):
    eval_type = "generative"

    def __init__(self, size: int, split: Literal["train", "test"] = "train", **view: int | None):
        super().__init__(**view)
        if split not in SPLIT_SEED:
            raise NanochatError(f"{type(self).__name__} split must be train or test, got {split!r}")
        self.size, self.split = size, split
        self.words = word_list()

    @property
    def name(self) -> str:
        return f"{type(self).__name__}:{self.split}"

    def num_examples(self) -> int:
        return self.size

    def rng(self, index: int) -> random.Random:
        return random.Random(SPLIT_SEED[self.split] + index)


class SimpleSpelling(_SeededTask):
    def get_example(self, index: int) -> ConversationDict:
        word = self.rng(index).choice(self.words)
        return {
            "messages": [
                {"role": "user", "content": f"Spell the word: {word}"},
                {"role": "assistant", "content": f"{word}:{','.join(word)}"},
            ]
        }

    def evaluate(self, conversation: ConversationDict, completion: str) -> bool:
        return completion.strip() == last_text(conversation)


class SpellingBee(_SeededTask):
    def get_example(self, index: int) -> ConversationDict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.7 else rng.choice(ALPHABET)
        question = rng.choice(QUESTIONS).format(l=letter, w=word)
        count = word.count(letter)
        lines, running = [], 0
        for i, ch in enumerate(word, start=1):
            if ch == letter:
                running += 1
                lines.append(f"{i}:{ch} hit, count={running}")
            else:
                lines.append(f"{i}:{ch}")
        manual = (
            f"Let me spell '{word}' and count the letter '{letter}' as I go.\n\n"
            f"{word}:{','.join(word)}\n\n" + "\n".join(lines) + f"\n\nBy hand I count {count}.\n\n"
            "Let me check that with Python:\n\n"
        )
        parts = [
            {"type": "text", "text": manual},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"},
        ]
        return {
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "word": word,
            "letter": letter,
        }

    def evaluate(self, conversation: ConversationDict, completion: str) -> bool:
        reference = extract_hash_answer(last_text(conversation))
        return reference is not None and extract_hash_answer(completion) == reference
