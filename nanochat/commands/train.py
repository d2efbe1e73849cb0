"""``nanochat train pretrain|midtrain|sft``: one stage on Ray Train + DeepSpeed (see docs/training.md);
``nanochat train rl``: reinforcement learning with rollout actors and a learner (docs/rl.md)."""

from __future__ import annotations

import argparse

from nanochat.commands.config import add_console_args, add_preset_args
from nanochat.stages import RL, STAGES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training stage on Ray Train + DeepSpeed")
    tsub = p.add_subparsers(dest="train_stage", metavar="STAGE", required=True)
    for stage in STAGES:
        sp = tsub.add_parser(stage.name, help=stage.help)
        _add_train_args(sp)
        sp.set_defaults(func=lambda args, _stage=stage.name: _run(_stage, args), uses_ray=True)
    rl = tsub.add_parser(RL.name, help=RL.help)
    _add_train_args(rl)
    rl.add_argument("--rollout-actors", type=int, default=None,
                    help="rollout actors, each holding an Engine (default: preset rl.num_rollout_actors)")
    rl.set_defaults(func=_run_rl, uses_ray=True)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    add_preset_args(parser)
    add_console_args(parser)
    parser.add_argument("--from", dest="from_checkpoint", default=None, metavar="CKPT",
                        help="midtrain/sft: starting checkpoint dir, tag dir or stage name (default: latest of the "
                             "previous stage: base→mid, mid→sft)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: d<depth>, or the source's tag)")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default: preset ray.num_workers)")
    parser.add_argument("--restart", action="store_true",
                        help="start over instead of resuming this stage/tag's latest checkpoint")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="checkpoint and stop at this step (rerun to resume)")


def _run(stage: str, args: argparse.Namespace) -> int:
    """Validate the preset (before Ray starts), train, print the summary path."""
    from nanochat.config import load_preset
    from nanochat.eval.chat_eval import letter_accuracy
    from nanochat.train.trainer import train_stage

    preset = load_preset(args.preset, args.overrides)
    result = train_stage(stage, preset, from_checkpoint=args.from_checkpoint, tag=args.tag,
                         num_workers=args.num_workers, restart=args.restart, stop_at_step=args.stop_at_step,
                         chat_evaluator=letter_accuracy)
    m = result.metrics
    val = {k: round(m[k], 4) for k in ("val/bpb", "val/loss") if isinstance(m.get(k), float)}
    print(f"{stage} done: {result.num_iterations} steps in {result.wall_seconds:.0f}s, {val}; "
          f"model {result.checkpoint}; summary {result.summary_path}", flush=True)
    return 0


def _run_rl(args: argparse.Namespace) -> int:
    """Validate the preset (before Ray starts), run/resume the RL stage, print where it ended."""
    from nanochat.config import load_preset
    from nanochat.rl.run import train_rl

    preset = load_preset(args.preset, args.overrides)
    result = train_rl(preset, from_checkpoint=args.from_checkpoint, tag=args.tag, restart=args.restart,
                      stop_at_step=args.stop_at_step, num_rollout_actors=args.rollout_actors,
                      num_workers=args.num_workers)
    m = result.metrics
    shown = {k: round(m[k], 4) for k in ("reward/mean", "eval/pass@1") if isinstance(m.get(k), float)}
    print(f"rl done: step {m.get('step')} of {result.num_iterations} in {result.wall_seconds:.0f}s, {shown}; "
          f"model {result.checkpoint}; summary {result.summary_path}", flush=True)
    return 0
