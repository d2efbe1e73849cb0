"""RL stage (issue 16): the REINFORCE loss, rewards, rollouts, and a short real run on Ray that learns."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from nanochat.rl.loss import group_advantages, reinforce_loss, token_logprobs
from nanochat.rl.rewards import TaskReward, rl_tasks
from nanochat.rl.rollout import Group, Sample


def test_loss_equals_the_reference_formula_on_a_hand_computed_example():
    # One question, 3 samples, rewards 1, 0, 0: baseline 1/3, advantages 2/3, -1/3, -1/3.
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0]])).reshape(-1)
    assert adv.tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    logp = torch.tensor([[-0.5, -1.0, -9.0], [-2.0, -9.0, -9.0], [-0.1, -0.2, -0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    # -(1/N) sum_i A_i sum_t logp: N = 6 sampled tokens;
    # sum = 2/3 * -1.5 + -1/3 * -2.0 + -1/3 * -0.6 = -1 + 2/3 + 0.2 = -2/15  ->  loss = (2/15) / 6 = 1/45
    assert reinforce_loss(logp, mask, adv).item() == pytest.approx(1 / 45)
    # the normalizer is the step's token count when a step is split into micro-batches
    parts = reinforce_loss(logp[:2], mask[:2], adv[:2], 6) + reinforce_loss(logp[2:], mask[2:], adv[2:], 6)
    assert parts.item() == pytest.approx(1 / 45)


def test_advantage_is_reward_minus_the_mean_of_its_own_question_only():
    adv = group_advantages(torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    assert adv.tolist() == [[0.5, 0.5, -0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]


def test_token_logprobs_are_log_softmax_at_the_targets_and_zero_on_padding():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    logp = token_logprobs(logits, torch.tensor([[1, -1]]))
    assert logp.tolist()[0] == pytest.approx([torch.log(torch.tensor(0.5)).item(), 0.0])


def _groups(rewards: list[list[float]], seed: int = 0) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for q, rs in enumerate(rewards):
        samples = []
        for r in rs:
            completion = torch.randint(10, 200, (5,), generator=g).tolist()
            samples.append(Sample([1, 2, 3] + completion, [0, 0, 0] + [1] * 5, r, 5))
        out.append(Group(q, samples))
    return out


def test_a_group_whose_samples_all_got_the_same_reward_contributes_zero_gradient(tiny_model_factory):
    from nanochat.rl.learner import batch_rows

    model = tiny_model_factory()

    def grads(groups: list[Group], num_tokens: float | None = None) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=False)
        x, y, mask, adv = batch_rows(groups, pad_id=0)
        reinforce_loss(token_logprobs(model(x), y), mask, adv, num_tokens).backward()
        return [p.grad.clone() for p in model.parameters()]

    same, mixed = _groups([[1.0, 1.0, 1.0]]), _groups([[1.0, 0.0, 0.0]], seed=1)
    assert all(g.abs().max() == 0 for g in grads(same))
    assert any(g.abs().max() > 0 for g in grads(mixed))
    # with the normalizer fixed, adding an all-equal group changes nothing
    together, alone = grads(same + mixed), grads(mixed, num_tokens=30)
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b)


def test_arithmetic_reward_is_one_for_the_right_final_answer_only():
    train, test, reward = rl_tasks("arithmetic")
    conv = train[0]
    question = conv["messages"][0]["content"]
    a, op, b = question.removeprefix("What is ").removesuffix("?").split()
    answer = int(a) + int(b) if op == "+" else int(a) - int(b)
    assert reward(conv, f"#### {answer}") == 1.0
    assert reward(conv, f"#### {answer + 1}") == 0.0
    assert reward(conv, "no answer") == 0.0
    assert train[0] != test[0] or train[1] != test[1]  # held-out questions come from another seed


def test_task_reward_scores_a_failing_check_as_zero():
    class Broken:
        def evaluate(self, conversation, completion):
            raise RuntimeError("bad completion")

    assert TaskReward(Broken())({"messages": []}, "x") == 0.0


def test_gpu_presets_default_to_gsm8k_and_tiny_to_arithmetic():
    from nanochat.config import load_preset

    assert load_preset("d20").rl.task == "gsm8k"
    tiny = load_preset("tiny").rl
    assert tiny.task == "arithmetic" and tiny.max_staleness == 0


def test_pass_at_k_and_group_stats_on_a_hand_made_step():
    from nanochat.rl.loop import group_stats, pass_at_k

    groups = _groups([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    assert pass_at_k(groups, 2) == {"eval/pass@1": 0.5, "eval/pass@2": 0.75, "eval/reward_mean": 0.5}
    stats = group_stats(groups)
    assert stats["groups/all_correct"] == 0.25 and stats["groups/all_wrong"] == 0.25
    assert stats["reward/mean"] == 0.5 and stats["seq_len/mean"] == 5


def test_rollout_masks_the_prompt_and_keeps_the_end_of_turn_token(tiny_model_factory, tiny_tokenizer):
    from nanochat.engine import Engine, SamplingParams
    from nanochat.rl.rollout import sample_groups

    train, _, reward = rl_tasks("arithmetic")
    model = tiny_model_factory()
    engine = Engine(model, tiny_tokenizer, max_batch_size=8, prefix_cache=False)
    convs = [train[0], train[1]]
    with torch.inference_mode():
        groups = sample_groups(engine, tiny_tokenizer, convs, [0, 1], SamplingParams(n=4, max_tokens=6, seed=1), reward)
    assert [g.question for g in groups] == [0, 1] and all(len(g.samples) == 4 for g in groups)
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    for g, conv in zip(groups, convs):
        prompt = tiny_tokenizer.render_for_completion(conv)
        for s in g.samples:
            assert s.tokens[: len(prompt)] == prompt and s.mask[: len(prompt)] == [0] * len(prompt)
            assert len(s.tokens) == len(prompt) + s.completion_tokens == len(s.mask)
            assert 1 <= s.completion_tokens <= 6 + 1 and s.reward in (0.0, 1.0)
            assert end not in s.tokens[len(prompt):-1]


def test_the_deepspeed_learner_takes_the_formulas_step_and_resumes_exactly(gloo_world_of_one, tiny_model_factory,
                                                                           tiny_tokenizer, tmp_path):
    from nanochat.checkpoint import read_meta, save_checkpoint
    from nanochat.config import load_preset
    from nanochat.rl.learner import Learner, batch_rows, learner_settings, optimizer_dir
    from nanochat.train.optim import build_optimizer

    model = tiny_model_factory()
    src = save_checkpoint(tmp_path / "sft" / "step_000000", model, model.config, tiny_tokenizer, "sft", 0)
    preset = load_preset("tiny", ["rl.optimizer=adamw", "rl.device_batch_size=4"])
    groups = _groups([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    learner = Learner(src, preset.rl, preset.sft, torch.device("cpu"))
    out = learner.train_step(groups, num_iterations=10)  # 8 live rows: two micro-batches, one optimizer step
    assert out["weights_version"] == 1 and out["live_rows"] == 8 and out["lr_mult"] == 1.0
    # the same step by hand: the whole batch at once, the shared optimizer groups, no DeepSpeed
    plain = tiny_model_factory()
    opt, _ = build_optimizer(plain, learner_settings(preset.rl, preset.sft), torch.float32)
    x, y, mask, adv = batch_rows(groups, pad_id=tiny_tokenizer.get_bos_token_id())
    loss = reinforce_loss(token_logprobs(plain(x), y), mask, adv)
    loss.backward()
    opt.step()
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for name, value in plain.state_dict().items():  # AdamW's first step moves each weight by ~lr (3e-3)
        torch.testing.assert_close(learner.weights()[name], value, rtol=1e-4, atol=3e-5)
    # checkpoint at step 1, then a resumed learner's step 2 equals the uninterrupted one's
    path = learner.save(tmp_path / "rl", "t")
    assert read_meta(path)["extra"]["rl"] == {"step": 1, "weights_version": 1, "questions_seen": 3,
                                              "learner_workers": 1}
    learner.train_step(groups, num_iterations=10)
    resumed = Learner(path, preset.rl, preset.sft, torch.device("cpu"))
    resumed.restore(optimizer_dir(tmp_path / "rl", 1), 1, 1, 3, 1)
    assert resumed.train_step(groups, num_iterations=10)["weights_version"] == 2
    for name, value in learner.weights().items():
        torch.testing.assert_close(resumed.weights()[name], value)


def _learner_rank(rank: int, world: int, store: str, src: str, out: str, zero_stage: int) -> None:
    """One rank of a data-parallel learner: one step on _DP_REWARDS' groups; rank 0 saves loss and weights."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    from nanochat.config import load_preset
    from nanochat.rl.learner import Learner

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=5))
    preset = load_preset("tiny", ["rl.optimizer=adamw", "rl.device_batch_size=2", f"sft.zero_stage={zero_stage}"])
    learner = Learner(src, preset.rl, preset.sft, torch.device("cpu"), rank, world)
    loss = learner.train_step(_groups(_DP_REWARDS), num_iterations=10)["loss"]
    weights = learner.weights()
    if rank == 0:
        torch.save({"loss": loss, "weights": weights}, out)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo sometimes aborts at interpreter exit (ray-on-this-machine pitfall 7)


# 5 live rows (the all-equal group has none): with device_batch_size 2, rank 0 gets 3 rows (2 micro-batches)
# and rank 1 gets 2 (1 micro-batch + a one-token forward that keeps ZeRO-3's gathers in lockstep)
_DP_REWARDS = [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]


@pytest.mark.slow
def test_a_two_worker_zero3_learner_takes_the_formulas_step(tiny_model_factory, tiny_tokenizer, tmp_path):
    import torch.multiprocessing as mp

    from nanochat.checkpoint import save_checkpoint
    from nanochat.config import load_preset
    from nanochat.rl.learner import batch_rows, learner_settings
    from nanochat.train.optim import build_optimizer

    model = tiny_model_factory()
    src = str(save_checkpoint(tmp_path / "sft" / "step_000000", model, model.config, tiny_tokenizer, "sft", 0))
    mp.spawn(_learner_rank, args=(2, str(tmp_path / "store"), src, str(tmp_path / "out.pt"), 3), nprocs=2, join=True)
    two = torch.load(tmp_path / "out.pt", weights_only=False)
    preset = load_preset("tiny", ["rl.optimizer=adamw"])
    opt, _ = build_optimizer(model, learner_settings(preset.rl, preset.sft), torch.float32)
    x, y, mask, adv = batch_rows(_groups(_DP_REWARDS), pad_id=tiny_tokenizer.get_bos_token_id())
    loss = reinforce_loss(token_logprobs(model(x), y), mask, adv)
    loss.backward()
    opt.step()
    assert two["loss"] == pytest.approx(loss.item(), abs=1e-6)  # float32 sums in another order
    for name, value in model.state_dict().items():
        torch.testing.assert_close(two["weights"][name], value, rtol=1e-4, atol=3e-5)


# ---- slow: a real RL run on Ray (Ray Train learner + rollout actors) that learns, interrupted and resumed ----

SFT_STEPS = 100
RL_OVERRIDES = ["rl.task=arithmetic", "rl.num_samples=8", "rl.questions_per_step=16", "rl.max_new_tokens=12",
                "rl.num_iterations=30", "rl.eval_every=30", "rl.eval_questions=128", "rl.pass_k=4",
                "rl.save_every=10", "rl.optimizer=adamw", "rl.init_lr_frac=1.0", "rl.num_rollout_actors=2",
                "rl.rollout_cpus=1", "rl.keep_checkpoints=4"]


def _sft_on_arithmetic(tokenizer, steps: int, hash_share: float = 0.25):
    """A 2-layer model SFT'd briefly on arithmetic, answering ``#### N`` in only ``hash_share`` of the examples
    (``= N`` otherwise): it gets some sums right, and the reward (which needs ``####``) has room to rise
    when RL moves it to the rewarded format, the kind of change RL makes in a few dozen steps."""
    from nanochat.model import GPTConfig, build_model
    from nanochat.tasks.arithmetic import Arithmetic

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    model = build_model(config)
    task = Arithmetic(2000, "train")
    convs = [task[i] for i in range(len(task))]
    for i, conv in enumerate(convs):
        if (i * 7919) % 100 >= 100 * hash_share:
            conv["messages"][1]["content"] = conv["messages"][1]["content"].replace("#### ", "= ")
    rows = [tokenizer.render_conversation(conv) for conv in convs]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = [rows[(step * 16 + i) % len(rows)] for i in range(16)]
        width = max(len(ids) for ids, _ in batch)
        x, y = torch.zeros((16, width - 1), dtype=torch.long), torch.full((16, width - 1), -1)
        for i, (ids, mask) in enumerate(batch):
            target = torch.tensor(ids[1:])
            target[torch.tensor(mask[1:]) == 0] = -1
            x[i, : len(ids) - 1], y[i, : len(ids) - 1] = torch.tensor(ids[:-1]), target
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, config


@contextlib.contextmanager
def _one_thread():
    """Small in-process torch work while Ray's processes share the 2 cores: 2 threads ran it ~25x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rl_run(tiny_tokenizer, ray_session, tmp_path_factory):
    """SFT briefly, then RL to step 10 (stopped), then a rerun that resumes and finishes at step 30."""
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.config import load_preset
    from nanochat.rl.run import train_rl

    base = tmp_path_factory.mktemp("rl_base")
    with _one_thread():
        model, config = _sft_on_arithmetic(tiny_tokenizer, SFT_STEPS)
    save_checkpoint(checkpoint_dir("sft", "d2", SFT_STEPS, base), model, config, tiny_tokenizer, "sft", SFT_STEPS)
    preset = load_preset("tiny", RL_OVERRIDES)
    first = train_rl(preset, stop_at_step=10, base=base)
    second = train_rl(preset, base=base)
    records = [json.loads(line) for line in (base / "checkpoints" / "rl" / "d2" / "metrics.jsonl").read_text().splitlines()]
    return base, first, second, records


@pytest.mark.slow
def test_rl_raises_held_out_reward_well_outside_the_sample_noise(rl_run):
    _, _, _, records = rl_run
    evals = [r for r in records if "eval/reward_mean" in r]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 30
    n = 128 * 4  # held-out questions x samples
    p0, p1 = start["eval/reward_mean"], end["eval/reward_mean"]
    noise = ((p0 * (1 - p0) + p1 * (1 - p1)) / n) ** 0.5  # std of the difference of two sample means
    print(f"held-out mean reward {p0:.3f} -> {p1:.3f} (noise std {noise:.3f}); "
          f"pass@1 {start['eval/pass@1']:.3f} -> {end['eval/pass@1']:.3f}")
    assert p1 - p0 > 4 * noise, (p0, p1, noise)
    for key in ("reward/mean", "seq_len/mean", "groups/all_correct", "groups/all_wrong", "time/rollout_s",
                "time/learner_s", "learner_idle_frac", "eval/pass@4"):
        assert key in end, key


@pytest.mark.slow
def test_an_interrupted_rl_run_resumes_at_the_same_step_and_weights_version(rl_run):
    from nanochat.checkpoint import read_meta, resolve_checkpoint, step_of

    base, first, second, records = rl_run
    assert step_of(first.checkpoint) == 10 and read_meta(first.checkpoint)["extra"]["rl"]["weights_version"] == 10
    steps = [r["step"] for r in records if "reward/mean" in r]
    assert steps == list(range(1, 31))  # the rerun continued at step 11: no step repeated, none skipped
    assert [r["weights_version"] for r in records if "reward/mean" in r] == steps
    meta = read_meta(second.checkpoint)
    assert resolve_checkpoint("rl", base=base) == Path(second.checkpoint)  # `nanochat eval chat --checkpoint rl`
    assert meta["stage"] == "rl" and meta["extra"]["rl"] == {"step": 30, "weights_version": 30, "questions_seen": 480,
                                                              "learner_workers": 1}
    assert sorted(p.name for p in (base / "checkpoints" / "rl" / "d2" / "optim").iterdir()) == [
        "step_000010", "step_000020", "step_000030"]  # DeepSpeed's optimizer state of each kept checkpoint
    assert all(r["learner_workers"] == 1 for r in records if "reward/mean" in r)


@pytest.mark.slow
def test_eval_chat_on_the_rl_checkpoint_fills_the_reports_rl_column(rl_run, monkeypatch):
    from nanochat.cli import main
    from nanochat.report import build_report, collect, summary_rows

    base, _, second, _ = rl_run
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    with _one_thread():
        assert main(["eval", "chat", "--checkpoint", "rl", "--tasks", "ARC-Easy,GSM8K", "--max-problems", "4",
                     "--max-new-tokens", "8", "--num-actors", "0"]) == 0
    results = json.loads((base / "eval" / "rl" / "d2" / "results.json").read_text())
    assert results["checkpoint"] == second.checkpoint
    assert {name: t["num_examples"] for name, t in results["tasks"].items()} == {"ARC-Easy": 4, "GSM8K": 4}
    rows = {row[0]: row[1:] for row in summary_rows(collect(base))}  # columns BASE, MID, SFT, RL
    assert isinstance(rows["ARC-Easy"][3], float) and isinstance(rows["GSM8K"][3], float)
    assert rows["ARC-Easy"][:3] == [None, None, None]  # nothing else ran in this base dir
    report = build_report(root=base).read_text()
    assert "## Chat RL" in report and "held-out pass@1 (first → last)" in report
    assert f"| ARC-Easy | - | - | - | {results['tasks']['ARC-Easy']['accuracy']:.4f} |" in report
