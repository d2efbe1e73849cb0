"""``nanochat run``: the main job — every stage from raw text to a chatting, evaluated model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from nanochat.commands.config import add_console_args, add_preset_args
from nanochat.common import base_dir


def register(sub: argparse._SubParsersAction) -> None:
    from nanochat.pipeline import STAGE_NAMES, STAGES

    stages = "\n".join(f"  {s.name:<10} {s.description}" for s in STAGES)
    p = sub.add_parser(
        "run",
        help="run the whole pipeline (data → tokenizer → pretrain → eval → mid → SFT → eval → report)",
        description=(
            "Run every stage as one resumable job. Finished stages are skipped on a rerun; a crash "
            "resumes at the failed stage.\n\nstages:\n" + stages
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_preset_args(p)
    p.add_argument("--from-stage", choices=STAGE_NAMES, help="rerun this stage and every later one")
    p.add_argument("--stop-after", choices=STAGE_NAMES, help="stop after this stage")
    p.add_argument("--force", action="store_true", help="rerun every stage, ignoring completion records")
    p.add_argument(
        "--prompt", default="Who are you?", help="the sample question asked of the final model (default: %(default)s)"
    )
    add_console_args(p)
    p.set_defaults(func=run_main, uses_ray=True)


def run_main(args: argparse.Namespace) -> int:
    from nanochat.config import load_preset
    from nanochat.pipeline import run_pipeline
    from nanochat.ray_utils import init_ray

    preset = load_preset(args.preset, args.overrides)  # invalid configs fail before anything starts
    root = base_dir()  # the artifacts root, resolved once for the whole run
    init_ray(preset.ray.num_cpus, base=root)
    run_pipeline(preset, from_stage=args.from_stage, force=args.force, stop_after=args.stop_after, base=root)
    _print_summary(args.prompt, root, finished=args.stop_after in (None, "report"))
    return 0


def _print_summary(prompt: str, root: Path, finished: bool) -> None:
    print(f"\nartifacts:   {root}")
    print(f"checkpoints: {root / 'checkpoints'}")
    report = root / "report" / "report.md"
    if report.exists():
        print(f"report:      {report}")
    if not finished:
        return
    from nanochat.checkpoint import resolve_checkpoint
    from nanochat.commands.chat import answer_once

    checkpoint = resolve_checkpoint(None, base=root)
    print(f"\n> {prompt}")
    answer_once(checkpoint, prompt, temperature=0.0, max_tokens=64)
    print(f"\nchat with it: nanochat chat --checkpoint {checkpoint}")
    if os.environ.get("RAY_ADDRESS") is None:
        print("serve it:     nanochat serve   (OpenAI-compatible API and web UI on http://127.0.0.1:8000)")
