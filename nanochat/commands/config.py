"""``nanochat config show``: print a preset with overrides applied (every field, validated)."""

from __future__ import annotations

import argparse

from nanochat.config import available_presets, dump_preset, load_preset


def add_preset_args(parser: argparse.ArgumentParser, default: str = "tiny") -> None:
    """The shared ``--preset`` / ``--set`` pair every stage command takes."""
    parser.add_argument(
        "--preset", default=default, help=f"preset name ({', '.join(available_presets())}) or a YAML path"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a preset field, e.g. --set pretrain.matrix_lr=0.01 (repeatable)",
    )


def add_console_args(parser: argparse.ArgumentParser) -> None:
    """``-v`` and ``--no-dashboard``, for every command that starts Ray (see :mod:`nanochat.progress`)."""
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print everything, Ray's own log lines included (default: stage lines, progress bars, "
                             "warnings; Ray's lines go to its session log directory; also NANOCHAT_VERBOSE=1)")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="do not start the Ray dashboard of the local Ray (saves ~1 GB on small machines; "
                             "also NANOCHAT_DASHBOARD=0)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show a preset's full configuration")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the preset with overrides applied, as YAML")
    add_preset_args(show)
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    print(dump_preset(load_preset(args.preset, args.overrides)), end="")
    return 0
