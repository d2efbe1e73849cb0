"""The ``nanochat`` command line: one entry point, one sub-command group per stage.

Each group lives in the module that owns the feature; that module exposes
``register(subparsers)`` which adds its parser(s) and sets ``func`` (a callable taking the parsed
``argparse.Namespace`` and returning an exit code), and ``uses_ray=True`` for a command that may
start Ray: such a command runs under :func:`nanochat.ray_stop.stop_on_signals` (Ctrl-C and SIGTERM
stop it and everything its Ray started within a bound). This file only wires them together; the
``ray_jobs/*.py`` scripts run the same commands through :func:`run_job`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from typing import NoReturn

from nanochat.common import NanochatError

# Modules that contribute sub-commands, in --help order.
COMMAND_MODULES = [
    "nanochat.commands.tok",
    "nanochat.commands.checkpoint",
    "nanochat.commands.export",
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
            "Artifacts live under $NANOCHAT_BASE_DIR (default ~/.cache/nanochat). Ctrl-C or SIGTERM "
            "stops a command and the local Ray it started within 15 s (docs/deployment.md)."
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


def main(argv: list[str] | None = None, exit_process: bool | None = None) -> int:
    """Run one command; returns its exit code. ``exit_process`` (default: ``argv is None``, i.e. this
    is the program itself) ends the process with ``os._exit`` after a command that used Ray: its local
    Ray is stopped by then, and the interpreter's exit can hang in Ray's native threads."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2 if args.command is None else 0
    uses_ray = getattr(args, "uses_ray", False)
    if not (uses_ray and (argv is None if exit_process is None else exit_process)):
        return _run(args, uses_ray)
    try:
        code = _run(args, uses_ray)
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 - report it like Python would, then leave without the hang
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def run_job(*command: str) -> NoReturn:
    """Entry point of ``ray_jobs/<name>.py``: ``nanochat <command...>`` with this process's arguments.

    A job script is the program itself, so it takes the same flags, prints the same ``--help`` and
    exits the same way as the command (``ray job submit -- python ray_jobs/pretrain.py --help``
    shows ``nanochat train pretrain --help``).
    """
    sys.exit(main([*command, *sys.argv[1:]], exit_process=True))


def _run(args: argparse.Namespace, uses_ray: bool) -> int:
    try:
        if not uses_ray:
            return int(args.func(args) or 0)
        from nanochat.progress import console_options
        from nanochat.ray_stop import stop_on_signals

        # Ctrl-C and SIGTERM stop the command and the Ray it started within STOP_TIMEOUT_S; -v and
        # --no-dashboard hold for the command's duration.
        with console_options(getattr(args, "verbose", False), dashboard=not getattr(args, "no_dashboard", False)), \
                stop_on_signals():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    except NanochatError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
