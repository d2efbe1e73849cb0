"""Arguments shared by ``nanochat train <stage>`` and ``ray_jobs/<stage>.py`` (one parser, two callers)."""

from __future__ import annotations

import argparse

from nanochat.commands.config import add_preset_args


def add_train_args(parser: argparse.ArgumentParser) -> None:
    add_preset_args(parser)
    parser.add_argument("--from", dest="from_checkpoint", default=None, metavar="CKPT",
                        help="midtrain/sft: starting checkpoint dir, tag dir or stage name (default: latest of the "
                             "previous stage: base→mid, mid→sft)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: d<depth>, or the source's tag)")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (default: preset ray.num_workers)")
    parser.add_argument("--restart", action="store_true",
                        help="start over instead of resuming this stage/tag's latest checkpoint")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="checkpoint and stop at this step (rerun to resume)")


def run_from_args(stage: str, args: argparse.Namespace) -> int:
    """Validate the preset (before Ray starts), train, print the summary path."""
    from nanochat.config import load_preset
    from nanochat.train.trainer import train_stage

    preset = load_preset(args.preset, args.overrides)
    result = train_stage(stage, preset, from_checkpoint=args.from_checkpoint, tag=args.tag,
                         num_workers=args.num_workers, restart=args.restart, stop_at_step=args.stop_at_step)
    m = result.metrics
    val = {k: round(m[k], 4) for k in ("val/bpb", "val/loss") if isinstance(m.get(k), float)}
    print(f"{stage} done: {result.num_iterations} steps in {result.wall_seconds:.0f}s, {val}; "
          f"model {result.checkpoint}; summary {result.summary_path}", flush=True)
    return 0


def main(stage: str, argv: list[str] | None = None) -> int:
    """Entry point of ``ray_jobs/<stage>.py``: same flags as ``nanochat train <stage>``."""
    from nanochat.common import NanochatError

    parser = argparse.ArgumentParser(prog=f"ray_jobs/{stage}.py", description=f"nanochat {stage} on Ray Train")
    add_train_args(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(stage, args)
    except NanochatError as err:
        print(f"error: {err}", flush=True)
        return 2
