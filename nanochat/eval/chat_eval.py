"""Chat evaluations: categorical (ARC-Easy/Challenge, MMLU) and generative (GSM8K, HumanEval), ChatCORE.

Categorical: render the conversation for completion, one forward pass, read the logits at the last
prompt position restricted to the option-letter tokens, argmax letter vs gold — never sampling.
Rows are right-padded with BOS in batches aligned to global example indices, so a shard split
never changes a batch. Generative: the engine samples ``num_samples`` completions per problem
(temperature 0 = greedy; seeds derived from the example index); a problem passes if any does.
Task data and answer checks come from ``nanochat.tasks``; HumanEval programs run in the sandbox.
``source="hub"`` tasks read their downloads from ``<base>/task_data`` (``base``, the artifacts root, is
passed in: in a shard's payload for the eval actors; default ``$NANOCHAT_BASE_DIR``).
"""

from __future__ import annotations

from os import PathLike
from typing import Any

import torch

from nanochat.common import NanochatError

CATEGORICAL_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU")
GENERATIVE_TASKS = ("GSM8K", "HumanEval")
# ChatCORE random baselines: 4-way multiple choice = 0.25, open-ended = 0.
# SpellingBee (DEC's 6th task) joins the mean when it ran; the other five are required.
CHATCORE_BASELINES: dict[str, float] = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0,
                                        "HumanEval": 0.0, "SpellingBee": 0.0}
CHATCORE_REQUIRED = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
DEFAULT_GENERATION = {"num_samples": 1, "temperature": 0.0, "top_k": 50, "max_new_tokens": 512, "seed": 42}


class ChatEvalError(NanochatError):
    pass


def load_task(name: str, source: str = "builtin", base: str | PathLike | None = None):
    from nanochat.tasks import chat_eval_task

    task = chat_eval_task(name, source, base)
    if name.lower() == "humaneval" and getattr(task, "runner", "absent") is None:
        task.runner = run_in_sandbox
    return task


def run_in_sandbox(program: str) -> bool:
    from nanochat.eval.sandbox import execute_code

    return execute_code(program, timeout=5.0, memory_mb=256).success


# ---- categorical -------------------------------------------------------------------------------


def letter_token_ids(tokenizer, letters: list[str]) -> list[int]:
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:
            raise ChatEvalError(f"answer letter {letter!r} is {len(tokens)} tokens; categorical eval needs one token")
        ids.append(tokens[0])
    return ids


@torch.no_grad()
def categorical_batch(model, tokenizer, conversations: list[dict], device="cpu") -> list[str]:
    """The predicted letter for each conversation (one forward pass for the batch)."""
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.get_bos_token_id(), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    logits = model(ids.to(device))
    predictions = []
    for i, (conv, prompt) in enumerate(zip(conversations, prompts)):
        letters = conv["letters"]
        allowed = torch.tensor(letter_token_ids(tokenizer, letters), device=logits.device)
        best = int(logits[i, len(prompt) - 1, allowed].argmax())
        predictions.append(letters[best])
    return predictions


def categorical_shard(model, tokenizer, payload: dict[str, Any], indices: list[int], device="cpu") -> list[dict]:
    """Fan-out shard function; ``payload = {"task": name, "source": ..., "base": ..., "batch_size": B}``."""
    task = load_task(payload["task"], payload.get("source", "builtin"), payload.get("base"))
    batch_size = int(payload.get("batch_size", 8))
    records = []
    # group by global batch number so the same examples share a forward pass for any sharding
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(i // batch_size, []).append(i)
    for _, group in sorted(groups.items()):
        conversations = [task[i] for i in group]
        for i, conv, pred in zip(group, conversations, categorical_batch(model, tokenizer, conversations, device)):
            gold = conv["messages"][-1]["content"]
            records.append({"index": i, "task": payload["task"], "pred": pred, "gold": gold,
                            "correct": bool(task.evaluate(conv, pred))})
    return records


# ---- generative --------------------------------------------------------------------------------


def generative_shard(model, tokenizer, payload: dict[str, Any], indices: list[int], device="cpu") -> list[dict]:
    """Fan-out shard function; ``payload`` holds the task name, its source and base, and generation settings."""
    from nanochat.engine import Engine, SamplingParams

    task = load_task(payload["task"], payload.get("source", "builtin"), payload.get("base"))
    settings = {**DEFAULT_GENERATION, **{k: v for k, v in payload.items() if k in DEFAULT_GENERATION}}
    engine = Engine(model, tokenizer, max_batch_size=max(1, int(settings["num_samples"])))
    records = []
    for i in indices:
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        params = SamplingParams(
            max_tokens=int(settings["max_new_tokens"]), temperature=float(settings["temperature"]),
            top_k=settings["top_k"] or None, n=int(settings["num_samples"]), seed=int(settings["seed"]) + i,
        )
        completions = [c.text for c in engine.generate_batch(prompt, params)]
        passed = [bool(task.evaluate(conv, text)) for text in completions]
        records.append({"index": i, "task": payload["task"], "completions": completions, "passed": passed,
                        "correct": any(passed)})
    return records


def shard_function(task_name: str) -> str:
    """Import path of the shard function for a chat task (by its eval type)."""
    categorical = task_name in CATEGORICAL_TASKS or (
        task_name not in GENERATIVE_TASKS and load_task(task_name).eval_type == "categorical"
    )
    return "nanochat.eval.chat_eval:" + ("categorical_shard" if categorical else "generative_shard")


# ---- aggregation -------------------------------------------------------------------------------


def accuracy(records: list[dict]) -> float:
    return sum(r["correct"] for r in records) / len(records) if records else float("nan")


def letter_accuracy(model, tokenizer, device, problems: int, source: str = "builtin",
                    base: str | PathLike | None = None) -> dict[str, float]:
    """MMLU and ARC-Easy letter accuracy on their first ``problems`` eval questions (batches of 8).

    SFT's in-loop progress check (``sft.chat_eval_problems``): the driver passes this function to
    ``train_stage(chat_evaluator=...)``, so training never imports the eval package. Returns
    ``{"mmlu_acc", "arc-easy_acc"}`` in [0, 1]; the caller sets eval mode, no_grad and autocast.
    """
    out = {}
    for name in ("MMLU", "ARC-Easy"):
        payload = {"task": name, "source": source, "base": base, "batch_size": 8}
        out[f"{name.lower()}_acc"] = accuracy(categorical_shard(model, tokenizer, payload, list(range(problems)),
                                                                device=device))
    return out


def chatcore(accuracies: dict[str, float]) -> float | None:
    """Mean of ``(acc - base) / (1 - base)`` over the ChatCORE tasks; None unless all of them ran."""
    if any(name not in accuracies for name in CHATCORE_REQUIRED):
        return None
    centered = [(accuracies[n] - b) / (1.0 - b) for n, b in CHATCORE_BASELINES.items() if n in accuracies]
    return sum(centered) / len(centered)
