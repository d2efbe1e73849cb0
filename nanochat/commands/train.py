"""``nanochat train pretrain|midtrain|sft``: one stage on Ray Train + DeepSpeed (see docs/training.md)."""

from __future__ import annotations

import argparse

from nanochat.train.cli_args import add_train_args, run_from_args

HELP = {
    "pretrain": "pretrain the base model on the parquet shards",
    "midtrain": "mid-train a base checkpoint on the conversation mixture",
    "sft": "supervised fine-tuning of a mid checkpoint",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run a training stage on Ray Train + DeepSpeed")
    tsub = p.add_subparsers(dest="train_stage", metavar="STAGE", required=True)
    for stage, text in HELP.items():
        sp = tsub.add_parser(stage, help=text)
        add_train_args(sp)
        sp.set_defaults(func=lambda args, _stage=stage: run_from_args(_stage, args), uses_ray=True)
