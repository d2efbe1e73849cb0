"""CORE prompt rendering, continuation spans, scoring math, centering and partial labelling."""

from __future__ import annotations

import math
import random

import pytest
import torch

from nanochat.eval import core
from nanochat.eval.core import CoreTask

MC = CoreTask("arc_easy", "multiple_choice", 2, 25.0, "x.jsonl", "\nAnswer: ")
SCHEMA = CoreTask("winogrande", "schema", 1, 50.0, "x.jsonl")
LM = CoreTask("jeopardy", "language_modeling", 1, 0.0, "x.jsonl", "\nAnswer: ")


def test_multiple_choice_prompts_show_gold_for_fewshot_and_each_choice_for_item():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Q3", "choices": ["e", "f"], "gold": 0}
    assert core.render_prompts(MC, item, shots) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: e",
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQ3\nAnswer: f",
    ]


def test_schema_prompts_vary_the_context_and_share_the_continuation():
    shots = [{"context_options": ["A went", "B went"], "continuation": "home.", "gold": 1}]
    item = {"context_options": ["X ran", "Y ran"], "continuation": "away.", "gold": 0}
    assert core.render_prompts(SCHEMA, item, shots) == ["B went home.\n\nX ran away.", "B went home.\n\nY ran away."]


def test_language_modeling_prompts_trim_contexts_and_strip_the_prompt_without_continuation():
    shots = [{"context": "  SCIENCE: clue one \n", "continuation": "Sound"}]
    item = {"context": " HISTORY: clue two ", "continuation": "Rome"}
    without, with_cont = core.render_prompts(LM, item, shots)
    assert without == "SCIENCE: clue one\nAnswer: Sound\n\nHISTORY: clue two\nAnswer:"
    assert with_cont == "SCIENCE: clue one\nAnswer: Sound\n\nHISTORY: clue two\nAnswer: Rome"


def test_zero_shot_prompts_have_no_prefix():
    task = CoreTask("copa", "multiple_choice", 0, 50.0, "x.jsonl")
    assert core.render_prompts(task, {"query": "It rained, therefore", "choices": ["wet."], "gold": 0}, []) == [
        "It rained, therefore wet."
    ]


def test_fewshot_draw_uses_seed_1234_plus_index_and_excludes_the_item():
    data = [{"i": i} for i in range(30)]
    shots = core.fewshot_examples(data, 7, 10)
    expected = random.Random(1234 + 7).sample([i for i in range(30) if i != 7], 10)
    assert [s["i"] for s in shots] == expected
    assert all(s["i"] != 7 for s in shots)
    assert core.fewshot_examples(data, 7, 0) == []


def test_task_data_is_shuffled_with_seed_1337_then_cropped(tmp_path):
    import json

    path = tmp_path / "eval_data" / "x.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(20)))
    expected = list(range(20))
    random.Random(1337).shuffle(expected)
    assert [d["i"] for d in core.load_task_data(tmp_path, MC, 5)] == expected[:5]
    assert len(core.load_task_data(tmp_path, MC, -1)) == 20


def test_continuation_spans_for_each_task_type(tiny_tokenizer):
    bos = tiny_tokenizer.get_bos_token_id()
    enc = tiny_tokenizer.encode
    mc_tokens, starts, ends = core.tokenize_prompts(MC, ["The fox jumps", "The fox sleeps"], tiny_tokenizer)
    common = core.common_prefix_length(mc_tokens)
    assert mc_tokens[0][0] == bos and starts == [common, common] and ends == [len(t) for t in mc_tokens]
    sch_tokens, starts, ends = core.tokenize_prompts(SCHEMA, ["A dog ran away.", "The cat ran away."], tiny_tokenizer)
    suffix = core.common_suffix_length(sch_tokens)
    assert [e - s for s, e in zip(starts, ends)] == [suffix, suffix]
    lm_tokens, starts, ends = core.tokenize_prompts(LM, ["Q\nAnswer:", "Q\nAnswer: the fox"], tiny_tokenizer)
    assert lm_tokens == [[bos] + enc("Q\nAnswer: the fox")] and starts == [len(enc("Q\nAnswer:")) + 1]


class ControlledModel(torch.nn.Module):
    """Scoring-math double: the logits at every position put all mass on ``favorite``."""

    def __init__(self, vocab: int, favorite: int, rotary: int = 1024):
        super().__init__()
        self.vocab, self.favorite = vocab, favorite
        self.cos = torch.zeros(rotary, 1)

    def forward(self, ids):
        logits = torch.full((*ids.shape, self.vocab), -10.0)
        logits[..., self.favorite] = 10.0
        return logits


class FakeTokenizer:
    """One character = one token id (ord), BOS = 0."""

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, texts, prepend=None):
        return [[prepend] + [ord(c) for c in t] for t in texts]


def test_multiple_choice_picks_the_lowest_mean_continuation_loss():
    task = CoreTask("t", "multiple_choice", 0, 25.0, "x")
    data = [{"query": "q", "choices": ["xy", "zz", "zx"], "gold": 1}]
    rec = core.evaluate_example(ControlledModel(256, ord("z")), FakeTokenizer(), task, data, 0)
    assert rec["pred"] == 1 and rec["correct"] is True
    assert rec["losses"][1] < rec["losses"][2] < rec["losses"][0]


def test_schema_scores_the_shared_continuation():
    task = CoreTask("t", "schema", 0, 50.0, "x")
    data = [{"context_options": ["aa", "ab"], "continuation": "zz", "gold": 0}]
    rec = core.evaluate_example(ControlledModel(256, ord("z")), FakeTokenizer(), task, data, 0)
    # identical continuations after different contexts: the controlled model scores them equally -> first wins
    assert rec["losses"][0] == pytest.approx(rec["losses"][1]) and rec["pred"] == 0


def test_language_modeling_needs_every_continuation_token_greedy():
    task = CoreTask("t", "language_modeling", 0, 0.0, "x", "")
    model, tok = ControlledModel(256, ord("z")), FakeTokenizer()
    assert core.evaluate_example(model, tok, task, [{"context": "q", "continuation": "zzz"}], 0)["correct"]
    assert not core.evaluate_example(model, tok, task, [{"context": "q", "continuation": "zza"}], 0)["correct"]


def test_overlong_prompts_are_cropped_from_the_left():
    task = CoreTask("t", "language_modeling", 0, 0.0, "x", "")
    model = ControlledModel(256, ord("z"), rotary=8)
    rec = core.evaluate_example(model, FakeTokenizer(), task, [{"context": "q" * 50, "continuation": "zz"}], 0)
    assert rec["correct"]


def test_centered_accuracy_formula():
    assert core.centered_accuracy(0.25, 25.0) == 0.0
    assert core.centered_accuracy(1.0, 62.0) == 1.0
    assert core.centered_accuracy(0.5, 9.1) == pytest.approx((0.5 - 0.091) / (1 - 0.091))
    assert core.centered_accuracy(0.3, 0.0) == 0.3


def test_core_is_the_plain_mean_and_full_only_with_all_22_tasks():
    full = {name: {"centered": i / 22} for i, name in enumerate(core.CORE_TASK_NAMES)}
    summary = core.core_summary(full)
    assert not summary["partial"] and summary["label"] == "CORE" and summary["missing"] == []
    assert summary["core"] == pytest.approx(sum(i / 22 for i in range(22)) / 22)


def test_partial_core_is_labelled_with_its_task_list():
    results = {"copa": {"centered": 0.2}, "piqa": {"centered": 0.4}}
    summary = core.core_summary(results)
    assert summary["partial"] and summary["label"] == "CORE (partial: 2/22 tasks)"
    assert summary["tasks"] == ["copa", "piqa"] and "winograd" in summary["missing"]
    assert summary["core"] == pytest.approx(0.3)
    assert math.isnan(core.core_summary({})["core"])


def test_reference_task_table_matches_dclm_metadata():
    table = {t.label: (t.task_type, t.num_fewshot, t.random_baseline) for t in core.CORE_TASKS}
    assert len(table) == 22
    assert table["bigbench_language_identification"] == ("multiple_choice", 10, 9.1)
    assert table["boolq"] == ("multiple_choice", 10, 62.0)
    assert table["agi_eval_lsat_ar"] == ("multiple_choice", 3, 20.0)
    assert table["winograd"][0] == table["winogrande"][0] == "schema"
    assert sum(1 for t in table.values() if t[0] == "language_modeling") == 9
