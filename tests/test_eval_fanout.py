"""Fan-out over Ray actors on a real tiny checkpoint: same numbers for 1 or 2 actors, crash -> retry."""

from __future__ import annotations

import json

import pytest
from _helpers_eval import TINY_TASKS, save_tiny_checkpoint, tiny_items, write_tiny_bundle

from nanochat.eval import core
from nanochat.eval.fanout import make_shards, run_fanout
from nanochat.eval.runner import format_table, run_base_eval


def test_shards_cover_every_index_once_and_respect_alignment():
    shards = make_shards(list(range(50)), num_actors=3, align=8)
    assert [i for s in shards for i in s] == list(range(50))
    assert all(len(s) % 8 == 0 for s in shards[:-1])


def _payload(task):
    return {"task": task.to_dict(), "data": tiny_items(task, 8)}


def test_in_process_base_eval_writes_results_and_labels_partial_core(base_dir, tiny_tokenizer, tiny_model_factory,
                                                                     tmp_path):
    ckpt = save_tiny_checkpoint(tiny_model_factory, tiny_tokenizer, base_dir)
    bundle = write_tiny_bundle(tmp_path / "bundle")
    results = run_base_eval(ckpt, max_per_task=-1, num_actors=0, data=str(bundle))
    out = base_dir / "eval" / "base" / "d2"
    saved = json.loads((out / "results.json").read_text())
    assert saved["core"]["partial"] and saved["core"]["tasks"] == ["copa", "winogrande", "bigbench_operators"]
    assert saved["core"]["missing"]["winograd"] == "no registry package provides this task"
    records = [json.loads(line) for line in (out / "copa.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    table = format_table(results)
    assert "CORE (partial: 3/22 tasks)" in table and "averaged over: copa, winogrande, bigbench_operators" in table


@pytest.mark.slow
def test_one_and_two_actors_give_identical_records(ray_session, base_dir, tiny_tokenizer, tiny_model_factory):
    ckpt = save_tiny_checkpoint(tiny_model_factory, tiny_tokenizer, base_dir)
    for task in TINY_TASKS[1:]:  # schema + language modelling (multiple choice: the crash test)
        indices = list(range(8))
        one = run_fanout(ckpt, "nanochat.eval.core:evaluate_shard", _payload(task), indices, num_actors=1)
        two = run_fanout(ckpt, "nanochat.eval.core:evaluate_shard", _payload(task), indices, num_actors=2)
        local = run_fanout(ckpt, "nanochat.eval.core:evaluate_shard", _payload(task), indices, num_actors=0)
        assert one == two == local
        assert [r["index"] for r in one] == indices


@pytest.mark.slow
def test_a_crashed_actor_has_its_shard_retried(ray_session, base_dir, tiny_tokenizer, tiny_model_factory, tmp_path):
    ckpt = save_tiny_checkpoint(tiny_model_factory, tiny_tokenizer, base_dir)
    task = TINY_TASKS[0]
    marker = tmp_path / "crashed-once"
    records = run_fanout(ckpt, "nanochat.eval.core:evaluate_shard", _payload(task), list(range(8)), num_actors=2,
                         fail_once_path=str(marker))
    assert marker.exists()  # an actor really died
    expected = [core.evaluate_shard(*_local(ckpt), _payload(task), [i])[0] for i in range(8)]
    assert records == expected


def _local(ckpt):
    from nanochat.eval.fanout import load_model

    model, tokenizer, _ = load_model(ckpt, "cpu")
    return model, tokenizer
