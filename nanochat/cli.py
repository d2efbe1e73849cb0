"""The ``nanochat`` command line: one entry point, one sub-command group per stage.

Each group lives in the module that owns the feature; that module exposes
``register(subparsers)`` which adds its parser(s) and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code). This file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nanochat.common import NanochatError

# Modules that contribute sub-commands, in --help order.
COMMAND_MODULES = [
    "nanochat.commands.tok",
    "nanochat.commands.checkpoint",
    "nanochat.commands.chat",
    "nanochat.commands.config",
    "nanochat.commands.data",
    "nanochat.commands.train",
    "nanochat.commands.eval",
    "nanochat.commands.report",
    "nanochat.commands.serve",
    "nanochat.commands.run",
    "nanochat.commands.tune",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanochat",
        description=(
            "nanochat on Ray: train a small ChatGPT-like model end to end (tokenizer, pretraining, "
            "mid-training, SFT, evaluation) and serve it. Without RAY_ADDRESS every stage runs on "
            "a local Ray started in-process; with it, the same commands run on your cluster. "
            "Artifacts live under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat)."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # feature not installed in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2 if args.command is None else 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except NanochatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
