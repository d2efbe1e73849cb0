"""Run a whole evaluation: pick tasks, fan out, aggregate, write ``eval/<stage>/<tag>/`` and print a table.

Shared by ``nanochat eval base|chat`` and ``ray_jobs/eval.py``. Outputs: ``results.json`` (per-task
accuracy/centered, CORE or ChatCORE, settings) and ``<task>.jsonl`` with one record per example.
``base`` (the artifacts root: eval data, shards, task downloads, outputs) is resolved once by each
entry function (default ``$NANOCHAT_BASE_DIR``) and handed down, to the eval actors in their payload.
"""

from __future__ import annotations

import json
import math
import time
from os import PathLike
from pathlib import Path
from typing import Any

from nanochat.checkpoint import checkpoint_tag, read_meta
from nanochat.common import atomic_write_text, base_dir, get_logger
from nanochat.eval import chat_eval, core, core_data
from nanochat.eval.fanout import run_fanout

log = get_logger(__name__)


def output_dir(checkpoint: str | Path, base: str | PathLike | None = None) -> Path:
    """``<base>/eval/<stage>/<tag>`` of a checkpoint."""
    meta = read_meta(checkpoint)
    tag = checkpoint_tag(checkpoint, meta)
    return base_dir(base) / "eval" / meta.get("stage", "base") / tag


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _select(available: list[str], wanted: list[str] | None, what: str) -> list[str]:
    if not wanted:
        return available
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise core.CoreEvalError(f"unknown {what} task(s) {unknown}; available: {', '.join(available)}")
    return wanted


def run_base_eval(checkpoint: str | Path, tasks: list[str] | None = None, max_per_task: int = -1,
                  num_actors: int = 1, data: str = "auto", out_dir: Path | None = None,
                  fail_once_path: str | None = None, bpb_source: str | None = None,
                  bpb_tokens: int = 65536, base: str | PathLike | None = None) -> dict[str, Any]:
    """CORE on ``checkpoint``; tasks absent from the data are reported missing, CORE labelled partial.

    With ``bpb_source`` (a pretraining data source) also bits per byte on its train and val shards."""
    base = base_dir(base)
    bundle = core_data.resolve_bundle(data, base)
    specs = {t.label: t for t in core.load_bundle_tasks(bundle)}
    names = [n for n in core.CORE_TASK_NAMES if n in specs] + [n for n in specs if n not in core.CORE_TASK_NAMES]
    chosen = _select(names, tasks, "CORE")
    out_dir = Path(out_dir) if out_dir else output_dir(checkpoint, base)
    results: dict[str, dict[str, Any]] = {}
    started = time.time()
    for name in chosen:
        spec = specs[name]
        items = core.load_task_data(bundle, spec, max_per_task)
        records = run_fanout(checkpoint, "nanochat.eval.core:evaluate_shard", {"task": spec.to_dict(), "data": items},
                             list(range(len(items))), num_actors=num_actors, desc=name, fail_once_path=fail_once_path)
        acc = sum(r["correct"] for r in records) / len(records)
        results[name] = {"accuracy": acc, "centered": core.centered_accuracy(acc, spec.random_baseline),
                         "random_baseline": spec.random_baseline, "num_examples": len(records),
                         "task_type": spec.task_type, "num_fewshot": spec.num_fewshot}
        _write_jsonl(out_dir / f"{name}.jsonl", records)
        log.info("%s: accuracy %.4f centered %.4f (%d examples)", name, acc, results[name]["centered"], len(records))
    summary = core.core_summary(results)
    missing = dict(core_data.missing_tasks(bundle))
    for name in summary["missing"]:
        missing.setdefault(name, "not selected (--tasks)" if name in specs else "not in the eval data")
    summary["missing"] = {n: missing[n] for n in summary["missing"]}
    out = {"kind": "base", "checkpoint": str(checkpoint), "data": str(bundle), "max_per_task": max_per_task,
           "num_actors": num_actors, "tasks": results, "core": summary, "seconds": time.time() - started}
    if bpb_source:
        out["bpb"] = split_bpb(checkpoint, bpb_source, bpb_tokens, base)
        out["seconds"] = time.time() - started
    atomic_write_text(out_dir / "results.json", json.dumps(out, indent=2))
    return out


def split_bpb(checkpoint: str | Path, source: str, max_tokens: int = 65536,
              base: str | PathLike | None = None) -> dict[str, float]:
    """``{"train": bpb, "val": bpb}`` of a checkpoint on the first shard of each split."""
    import pyarrow.parquet as pq

    from nanochat.checkpoint import load_checkpoint
    from nanochat.common import autodetect_device
    from nanochat.eval.bpb import evaluate_bpb
    from nanochat.sources.pretrain import list_shards

    device = str(autodetect_device())
    ckpt = load_checkpoint(checkpoint, device=device)
    out = {}
    for split in ("train", "val"):
        texts = pq.read_table(list_shards(source, split, base)[0], columns=["text"])["text"].to_pylist()
        out[split] = evaluate_bpb(ckpt.model, ckpt.tokenizer, texts, max_tokens, device=device)["bpb"]
        log.info("%s bpb: %.4f", split, out[split])
    return out


def run_chat_eval(checkpoint: str | Path, tasks: list[str] | None = None, max_problems: int = -1,
                  num_samples: int = 1, temperature: float = 0.0, top_k: int | None = 50,
                  max_new_tokens: int = 512, batch_size: int = 8, num_actors: int = 1, source: str = "builtin",
                  out_dir: Path | None = None, base: str | PathLike | None = None) -> dict[str, Any]:
    """ARC-Easy/Challenge, MMLU (categorical), GSM8K, HumanEval (generative) and ChatCORE."""
    base = base_dir(base)
    chosen = _select(list(chat_eval.CATEGORICAL_TASKS + chat_eval.GENERATIVE_TASKS) + ["SpellingBee"],
                     tasks, "chat") if tasks else list(chat_eval.CATEGORICAL_TASKS + chat_eval.GENERATIVE_TASKS)
    out_dir = Path(out_dir) if out_dir else output_dir(checkpoint, base)
    results: dict[str, dict[str, Any]] = {}
    started = time.time()
    for name in chosen:
        n = len(chat_eval.load_task(name, source, base))
        n = min(n, max_problems) if max_problems > 0 else n
        fn = chat_eval.shard_function(name)
        payload = {"task": name, "source": source, "base": str(base), "batch_size": batch_size, "num_samples": num_samples,
                   "temperature": temperature, "top_k": top_k, "max_new_tokens": max_new_tokens}
        align = batch_size if fn.endswith("categorical_shard") else 1
        records = run_fanout(checkpoint, fn, payload, list(range(n)), num_actors=num_actors, align=align, desc=name)
        acc = chat_eval.accuracy(records)
        results[name] = {"accuracy": acc, "num_examples": len(records), "eval_type":
                         "categorical" if align > 1 or fn.endswith("categorical_shard") else "generative"}
        _write_jsonl(out_dir / f"{name}.jsonl", records)
        log.info("%s: accuracy %.4f (%d problems)", name, acc, len(records))
    score = chat_eval.chatcore({k: v["accuracy"] for k, v in results.items()})
    out = {"kind": "chat", "checkpoint": str(checkpoint), "max_problems": max_problems,
           "generation": {"num_samples": num_samples, "temperature": temperature, "top_k": top_k,
                          "max_new_tokens": max_new_tokens},
           "num_actors": num_actors, "tasks": results, "chatcore": score, "seconds": time.time() - started}
    atomic_write_text(out_dir / "results.json", json.dumps(out, indent=2))
    return out


def format_table(results: dict[str, Any]) -> str:
    """Per-task table plus the CORE / ChatCORE line (partial CORE names the tasks it averages)."""
    lines = []
    if results["kind"] == "base":
        lines.append(f"{'task':<34} {'type':<18} {'n':>6} {'accuracy':>9} {'centered':>9}")
        for name, r in results["tasks"].items():
            lines.append(f"{name:<34} {r['task_type']:<18} {r['num_examples']:>6} {r['accuracy']:>9.4f} "
                         f"{r['centered']:>9.4f}")
        s = results["core"]
        lines.append(f"{s['label']}: {s['core']:.4f}")
        if s["partial"]:
            lines.append(f"  averaged over: {', '.join(s['tasks'])}")
            for name, why in s["missing"].items():
                lines.append(f"  missing: {name} ({why})")
    else:
        lines.append(f"{'task':<16} {'type':<12} {'n':>6} {'accuracy':>9}")
        for name, r in results["tasks"].items():
            lines.append(f"{name:<16} {r['eval_type']:<12} {r['num_examples']:>6} {r['accuracy']:>9.4f}")
        score = results["chatcore"]
        lines.append("ChatCORE: " + (f"{score:.4f}" if score is not None and not math.isnan(score)
                                     else "- (needs ARC-Easy, ARC-Challenge, MMLU, GSM8K and HumanEval)"))
    return "\n".join(lines)
