"""Chat eval pieces: GSM8K/HumanEval answer checks, categorical letter scoring, ChatCORE."""

from __future__ import annotations

import pytest
import torch

from nanochat.eval import chat_eval
from nanochat.tasks.base import extract_hash_answer
from nanochat.tasks.humaneval import build_program


def test_gsm8k_answer_is_the_number_after_hashes_without_commas():
    assert extract_hash_answer("so 3*4 = 12.\n#### 1,234") == "1234"
    assert extract_hash_answer("#### -7.5") == "-7.5"
    assert extract_hash_answer("the answer is 12") is None


HUMANEVAL_ROW = {
    "prompt": "from typing import List\n\ndef add(a: int, b: int) -> int:\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}


def test_humaneval_program_takes_the_first_fenced_block_and_runs_the_check():
    completion = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\nand ```python\nbroken(\n```"
    program = build_program(HUMANEVAL_ROW, completion)
    assert program.startswith("from typing import List\n\ndef add(a, b):")
    assert program.endswith("check(add)")
    assert chat_eval.run_in_sandbox(program)
    assert not chat_eval.run_in_sandbox(build_program(HUMANEVAL_ROW, "def add(a, b):\n    return a - b\n"))


class LetterModel(torch.nn.Module):
    def __init__(self, vocab: int, favorite: int):
        super().__init__()
        self.vocab, self.favorite = vocab, favorite

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits[..., self.favorite] = 5.0
        return logits


def _mc(answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "Multiple Choice question: 1+1?\n- 2=A\n- 3=B\n\nRespond only "
                          "with the letter of the correct answer."}, {"role": "assistant", "content": answer}],
            "letters": ["A", "B"]}


def test_categorical_reads_only_the_letter_logits(tiny_tokenizer):
    b_id = tiny_tokenizer.encode("B")[0]
    preds = chat_eval.categorical_batch(LetterModel(tiny_tokenizer.vocab_size, b_id), tiny_tokenizer,
                                        [_mc("A"), _mc("B")])
    assert preds == ["B", "B"]
    # a favourite token that is not a letter is ignored: the argmax is over the letters only
    preds = chat_eval.categorical_batch(LetterModel(tiny_tokenizer.vocab_size, 7), tiny_tokenizer, [_mc("A")])
    assert preds[0] in ("A", "B")


def test_chatcore_centers_with_reference_baselines_and_needs_all_tasks():
    accs = {"ARC-Easy": 0.25, "ARC-Challenge": 0.625, "MMLU": 1.0, "GSM8K": 0.1, "HumanEval": 0.0}
    assert chat_eval.chatcore(accs) == pytest.approx((0 + 0.5 + 1.0 + 0.1 + 0.0) / 5)
    assert chat_eval.chatcore({"ARC-Easy": 0.5}) is None
    assert chat_eval.chatcore({**accs, "SpellingBee": 0.6}) == pytest.approx((1.6 + 0.6) / 6)
