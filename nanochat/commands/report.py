"""``nanochat report``: build ``report.md`` and its plots from a run's artifacts (see nanochat.report)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write report.md (+ PNG plots) summarizing the run under $NANOCHAT_BASE_DIR",
        description="Gather tokenizer, training and evaluation artifacts into one markdown report with "
        "plots. Missing stages are shown as '-', so partial runs get a report too.",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default $NANOCHAT_BASE_DIR/report)")
    p.add_argument("--tag", default=None, help="model tag to report on, e.g. d4 (default: the latest of each stage)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from nanochat.report import build_report

    path = build_report(args.out, tag=args.tag)
    print(f"report written to {path}")
    plots = sorted(p.name for p in path.parent.glob("*.png"))
    if plots:
        print(f"plots: {', '.join(plots)}")
    return 0
