"""CORE: the DCLM 22-task in-context-learning metric for base models, scored as nanochat scores it.

What it is: task specs (shots, delimiter, random baseline), prompt rendering for the three task
types, per-example scoring with a model, centered accuracy and the CORE average. What it is not:
data download (``core_data``) or distribution over workers (``fanout``).

Procedure (reference section 5): each task's examples are shuffled with ``Random(1337)`` and
optionally cropped; example ``idx`` draws its few-shot items with ``Random(1234 + idx)`` from the
(cropped) set, excluding itself. Every sequence starts with BOS and is right-padded with BOS.
multiple_choice / schema pick the option with the lowest mean cross-entropy over the continuation
tokens; language_modeling is correct iff greedy argmax reproduces every continuation token.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from nanochat.common import NanochatError

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # data order (so --max-per-task takes a random subset)
FEWSHOT_SEED = 1234  # few-shot draw for example idx uses Random(FEWSHOT_SEED + idx)


class CoreEvalError(NanochatError):
    """CORE data or configuration is unusable; the message says how to fix it."""


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    random_baseline: float  # percent, as in DCLM's eval_meta_data.csv
    dataset_uri: str
    continuation_delimiter: str = " "

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ANSWER = "\nAnswer: "
# The 22 DCLM "low variance" tasks: (label, type, shots, baseline %, dataset path, delimiter).
# Shots and baselines from DCLM's eval_meta_data.csv; delimiters from its core task yaml.
CORE_TASKS: tuple[CoreTask, ...] = tuple(
    CoreTask(*row)
    for row in [
        ("hellaswag_zeroshot", "multiple_choice", 0, 25.0, "language_understanding/hellaswag.jsonl"),
        ("jeopardy", "language_modeling", 10, 0.0, "world_knowledge/jeopardy_all.jsonl", _ANSWER),
        ("bigbench_qa_wikidata", "language_modeling", 10, 0.0, "world_knowledge/bigbench_qa_wikidata.jsonl"),
        ("arc_easy", "multiple_choice", 10, 25.0, "world_knowledge/arc_easy.jsonl", _ANSWER),
        ("arc_challenge", "multiple_choice", 10, 25.0, "world_knowledge/arc_challenge.jsonl", _ANSWER),
        ("copa", "multiple_choice", 0, 50.0, "commonsense_reasoning/copa.jsonl"),
        ("commonsense_qa", "multiple_choice", 10, 20.0, "commonsense_reasoning/commonsense_qa.jsonl"),
        ("piqa", "multiple_choice", 10, 50.0, "commonsense_reasoning/piqa.jsonl", _ANSWER),
        ("openbook_qa", "multiple_choice", 0, 25.0, "commonsense_reasoning/openbook_qa.jsonl"),
        ("lambada_openai", "language_modeling", 0, 0.0, "language_understanding/lambada_openai.jsonl"),
        ("hellaswag", "multiple_choice", 10, 25.0, "language_understanding/hellaswag.jsonl"),
        ("winograd", "schema", 0, 50.0, "language_understanding/winograd_wsc.jsonl"),
        ("winogrande", "schema", 0, 50.0, "language_understanding/winogrande.jsonl"),
        ("bigbench_dyck_languages", "language_modeling", 10, 0.0, "symbolic_problem_solving/bigbench_dyck_languages.jsonl"),
        ("agi_eval_lsat_ar", "multiple_choice", 3, 20.0, "symbolic_problem_solving/agi_eval_lsat_ar.jsonl"),
        ("bigbench_cs_algorithms", "language_modeling", 10, 0.0, "symbolic_problem_solving/bigbench_cs_algorithms.jsonl"),
        ("bigbench_operators", "language_modeling", 10, 0.0, "symbolic_problem_solving/bigbench_operators.jsonl"),
        ("bigbench_repeat_copy_logic", "language_modeling", 10, 0.0,
         "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl"),
        ("squad", "language_modeling", 10, 0.0, "reading_comprehension/squad.jsonl"),
        ("coqa", "language_modeling", 0, 0.0, "reading_comprehension/coqa.jsonl"),
        ("boolq", "multiple_choice", 10, 62.0, "reading_comprehension/boolq.jsonl", _ANSWER),
        ("bigbench_language_identification", "multiple_choice", 10, 9.1,
         "language_understanding/bigbench_language_identification.jsonl"),
    ]
)
CORE_TASK_NAMES: tuple[str, ...] = tuple(t.label for t in CORE_TASKS)


# ---- bundle config -----------------------------------------------------------------------------


def load_bundle_tasks(bundle_dir: str | Path) -> list[CoreTask]:
    """Task specs from a bundle's ``core.yaml`` + ``eval_meta_data.csv`` (the bundle is the authority)."""
    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for p in (config_path, meta_path):
        if not p.exists():
            raise CoreEvalError(f"{p} is missing: {bundle_dir} is not an eval bundle (run `nanochat eval fetch-data`)")
    config = yaml.safe_load(config_path.read_text()) or {}
    with open(meta_path, newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for entry in config.get("icl_tasks", []):
        label = entry["label"]
        if label not in baselines:
            raise CoreEvalError(f"{meta_path} has no random baseline for task {label!r}")
        shots = entry.get("num_fewshot", [0])
        tasks.append(
            CoreTask(
                label=label,
                task_type=entry["icl_task_type"],
                num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                random_baseline=baselines[label],
                dataset_uri=entry["dataset_uri"],
                continuation_delimiter=entry.get("continuation_delimiter", " "),
            )
        )
    return tasks


def load_task_data(bundle_dir: str | Path, task: CoreTask, max_per_task: int = -1) -> list[dict[str, Any]]:
    """The task's examples, shuffled with ``Random(1337)`` and cropped to ``max_per_task`` (-1: all)."""
    path = Path(bundle_dir) / "eval_data" / task.dataset_uri
    if not path.exists():
        raise CoreEvalError(f"{path} is missing for task {task.label}; re-fetch the bundle")
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def fewshot_examples(data: list[dict[str, Any]], idx: int, num_fewshot: int) -> list[dict[str, Any]]:
    if num_fewshot <= 0:
        return []
    pool = [i for i in range(len(data)) if i != idx]
    # a tiny --max-per-task can leave fewer candidates than shots: use them all (the reference would fail)
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(pool, min(num_fewshot, len(pool)))]


# ---- prompt rendering --------------------------------------------------------------------------
# Few-shot blocks are each followed by a blank line; then the item itself.


def render_prompts_mc(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per choice; few-shot examples show their gold choice."""
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """One prompt per context option, all sharing the item's continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: list[dict]) -> list[str]:
    """``[prompt without continuation (stripped), prompt with continuation]``; contexts are trimmed."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    stem = f"{prefix}{item['context'].strip()}{delimiter}"
    return [stem.strip(), stem + item["continuation"]]


def render_prompts(task: CoreTask, item: dict, fewshot: list[dict]) -> list[str]:
    render = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
              "language_modeling": render_prompts_lm}.get(task.task_type)
    if render is None:
        raise CoreEvalError(f"task {task.label}: unknown type {task.task_type!r} (allowed: {', '.join(TASK_TYPES)})")
    return render(item, task.continuation_delimiter, fewshot)


def common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def common_suffix_length(seqs: list[list[int]]) -> int:
    return common_prefix_length([s[::-1] for s in seqs])


def tokenize_prompts(task: CoreTask, prompts: list[str], tokenizer) -> tuple[list[list[int]], list[int], list[int]]:
    """Token rows (BOS first) and each row's continuation span ``[start, end)``."""
    bos = tokenizer.get_bos_token_id()
    tokens = tokenizer.encode(prompts, prepend=bos)
    if task.task_type == "multiple_choice":
        start = common_prefix_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task.task_type == "schema":
        suffix = common_suffix_length(tokens)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, with_cont = tokens
    if with_cont[: len(without)] != without:
        raise CoreEvalError(
            f"task {task.label}: the prompt without its continuation does not tokenize to a prefix of the "
            "full prompt; check the task's continuation_delimiter"
        )
    return [with_cont], [len(without)], [len(with_cont)]


# ---- scoring -----------------------------------------------------------------------------------


def _crop(tokens: list[list[int]], starts: list[int], ends: list[int], max_len: int):
    """Keep the last ``max_len`` tokens of over-long rows (the continuation is at the end)."""
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(tokens, starts, ends):
        cut = max(0, len(t) - max_len)
        out_t.append(t[cut:])
        out_s.append(max(1, s - cut))
        out_e.append(e - cut)
    return out_t, out_s, out_e


@torch.no_grad()
def score_rows(model, tokens: list[list[int]], starts: list[int], ends: list[int], pad_id: int, device) -> dict:
    """Mean continuation loss per row and whether greedy argmax reproduces each continuation."""
    width = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), width), pad_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()
    # position p predicts token p+1: the continuation [s, e) is scored at positions [s-1, e-1)
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    preds = logits[:, :-1].argmax(dim=-1)
    mean_losses, exact = [], []
    for i, (s, e) in enumerate(zip(starts, ends)):
        mean_losses.append(losses[i, s - 1 : e - 1].mean().item())
        exact.append(bool(torch.equal(preds[i, s - 1 : e - 1], ids[i, s:e])))
    return {"mean_losses": mean_losses, "exact": exact}


def max_model_length(model) -> int:
    """Longest sequence the model's rotary table covers (10x its training context)."""
    cos = getattr(model, "cos", None)
    return int(cos.shape[0]) if cos is not None else int(model.config.sequence_len)


def evaluate_example(model, tokenizer, task: CoreTask, data: list[dict], idx: int, device="cpu") -> dict[str, Any]:
    """Score example ``idx`` of ``data`` (already shuffled/cropped); returns a JSON-able record."""
    item = data[idx]
    prompts = render_prompts(task, item, fewshot_examples(data, idx, task.num_fewshot))
    tokens, starts, ends = tokenize_prompts(task, prompts, tokenizer)
    tokens, starts, ends = _crop(tokens, starts, ends, max_model_length(model))
    scored = score_rows(model, tokens, starts, ends, tokenizer.get_bos_token_id(), device)
    record: dict[str, Any] = {"index": idx, "task": task.label}
    if task.task_type == "language_modeling":
        record["correct"] = scored["exact"][0]
    else:
        losses = scored["mean_losses"]
        pred = losses.index(min(losses))
        record.update(pred=pred, gold=int(item["gold"]), correct=pred == int(item["gold"]),
                      losses=[round(x, 6) for x in losses])
    return record


def evaluate_shard(model, tokenizer, payload: dict[str, Any], indices: list[int], device="cpu") -> list[dict]:
    """Fan-out entry point: ``payload = {"task": CoreTask dict, "data": [...]}``."""
    task = CoreTask(**payload["task"])
    return [evaluate_example(model, tokenizer, task, payload["data"], i, device) for i in indices]


# ---- aggregation -------------------------------------------------------------------------------


def centered_accuracy(accuracy: float, random_baseline_pct: float) -> float:
    """``(acc - b/100) / (1 - b/100)``: 0 at chance, 1 at perfect."""
    b = random_baseline_pct / 100.0
    return (accuracy - b) / (1.0 - b)


def core_summary(task_results: dict[str, dict[str, float]], expected: tuple[str, ...] = CORE_TASK_NAMES) -> dict:
    """CORE = plain mean of the centered scores; partial (and labelled so) unless all 22 ran.

    ``task_results`` maps label -> {"accuracy", "centered", ...}. Returns core, partial, the task
    list it averages and the missing tasks: a partial CORE is never presented as the full metric.
    """
    averaged = [t for t in expected if t in task_results]
    extra = sorted(t for t in task_results if t not in expected)
    averaged += extra
    missing = [t for t in expected if t not in task_results]
    core = sum(task_results[t]["centered"] for t in averaged) / len(averaged) if averaged else float("nan")
    partial = bool(missing) or bool(extra)
    label = "CORE" if not partial else f"CORE (partial: {len(averaged)}/{len(expected)} tasks)"
    return {"core": core, "partial": partial, "label": label, "tasks": averaged, "missing": missing}
