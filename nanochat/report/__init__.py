"""The run report: one markdown file (plus PNG plots) that tells the story of a whole run.

:func:`build_report` gathers the artifacts (:mod:`~nanochat.report.artifacts`, read-only), draws the
plots (:mod:`~nanochat.report.plots`) and writes ``report.md`` (:mod:`~nanochat.report.markdown`,
with :mod:`~nanochat.report.environment` for where it was generated). Anything missing is shown as
``-``: a partial run still gets a report.
"""

from __future__ import annotations

from pathlib import Path

from nanochat.common import atomic_write_text
from nanochat.report.artifacts import (
    RunArtifacts,
    StageArtifacts,
    collect,
    latest_tag,
    normalize_eval_results,
)
from nanochat.report.environment import environment_info
from nanochat.report.markdown import fmt, fmt_duration, render, summary_rows
from nanochat.report.plots import PLOT_NAMES, make_plots

__all__ = [
    "RunArtifacts", "StageArtifacts", "build_report", "collect", "fmt", "fmt_duration", "latest_tag",
    "normalize_eval_results", "summary_rows",
]


def build_report(out_dir: str | Path | None = None, tag: str | None = None, root: str | Path | None = None) -> Path:
    """Gather artifacts, draw the plots and write ``report.md``; returns its path."""
    run = collect(Path(root) if root else None, tag)
    out = Path(out_dir) if out_dir else run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    for stale in PLOT_NAMES:  # a plot from an earlier report must not outlive its data
        (out / f"{stale}.png").unlink(missing_ok=True)
    plots = make_plots(run, out)
    path = out / "report.md"
    atomic_write_text(path, render(run, plots, environment_info()))
    return path
