"""``nanochat tune``: an ASHA hyperparameter sweep over pretraining, each trial a real training run."""

from __future__ import annotations

import argparse

from nanochat.commands.config import add_console_args, add_preset_args


def register(sub: argparse._SubParsersAction) -> None:
    from nanochat.tune import DEFAULT_SPACE

    p = sub.add_parser(
        "tune",
        help="sweep pretraining hyperparameters with Ray Tune + ASHA (early stopping on val bpb)",
        description=(
            "Sweep pretraining hyperparameters. Every trial trains through the same Ray Train + DeepSpeed "
            "loop as `nanochat train pretrain`; ASHA stops poor trials early on validation bpb. Writes "
            "results.csv, val_bpb.png and best_preset.yaml (usable as --preset PATH)."
        ),
    )
    add_preset_args(p)
    p.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=KIND(ARGS)",
        help=(
            "a dimension to sweep, repeatable; KIND is choice, grid, uniform, loguniform or randint, e.g. "
            "--space 'pretrain.matrix_lr=loguniform(0.005,0.05)' --space 'model.depth=choice(2,4)'. "
            f"Default: {' '.join(DEFAULT_SPACE)}"
        ),
    )
    p.add_argument("--num-samples", type=int, default=4, help="trials to run (default: %(default)s)")
    p.add_argument(
        "--searcher",
        choices=["random", "optuna", "hyperopt"],
        default="random",
        help="search algorithm (optuna/hyperopt must be installed; default: %(default)s)",
    )
    p.add_argument(
        "--grace-period", type=int, default=1, help="evaluations before ASHA may stop a trial"
    )
    p.add_argument(
        "--max-concurrent", type=int, default=None, help="cap on trials at once (default: what fits)"
    )
    p.add_argument(
        "--name", default="sweep", help="sweep name; outputs go to $NANOCHAT_BASE_DIR/tune/NAME"
    )
    add_console_args(p)
    p.set_defaults(func=tune_main, uses_ray=True)


def tune_main(args: argparse.Namespace) -> int:
    from nanochat.ray_utils import init_ray
    from nanochat.tune import run_sweep

    init_ray()
    result = run_sweep(
        args.preset,
        args.overrides,
        args.space or None,
        num_samples=args.num_samples,
        searcher=args.searcher,
        grace_period=args.grace_period,
        name=args.name,
        max_concurrent=args.max_concurrent,
    )
    print(f"\n{result.num_trials} trials, {result.num_stopped_early} stopped early by ASHA")
    print(f"best val/bpb {result.best_bpb:.4f} with {result.best_params}")
    print(f"results:     {result.table}\nplot:        {result.plot}\nbest preset: {result.best_preset}")
    print(f"train it:    nanochat train pretrain --preset {result.best_preset}")
    return 0
