"""Hyperparameter sweeps with Ray Tune over the shared training loop (Train V2 pattern).

Each trial is a function trainable that builds and fits its own ``TorchTrainer`` (through
``train_stage``) with ``TuneReportCallback`` forwarding rank 0's reports to Tune, so ASHA can stop a
trial early on validation bpb. ``Tuner(TorchTrainer)`` is not used: it fails under Train V2.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanochat.common import NanochatError, atomic_write_text, base_dir, get_logger
from nanochat.config import Preset, dump_preset, load_preset

log = get_logger(__name__)

METRIC = "val/bpb"
DEFAULT_SPACE = [
    "pretrain.matrix_lr=loguniform(0.005,0.05)",
    "pretrain.embedding_lr=loguniform(0.05,0.5)",
    "pretrain.warmdown_ratio=choice(0.2,0.4)",
]
_SPEC = re.compile(r"^(?P<key>[\w.]+)=(?P<kind>choice|grid|uniform|loguniform|randint)\((?P<args>[^)]*)\)$")


class SweepError(NanochatError, ValueError):
    pass


def _scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text.strip())


def parse_space(specs: list[str]) -> dict[str, Any]:
    """``key=kind(args)`` strings → a Tune param space keyed by the dotted preset field."""
    from ray import tune

    space: dict[str, Any] = {}
    for spec in specs:
        m = _SPEC.match(spec.replace(" ", ""))
        if not m:
            raise SweepError(
                f"bad --space '{spec}': use KEY=KIND(ARGS) with KIND one of choice, grid, uniform, "
                "loguniform, randint, e.g. pretrain.matrix_lr=loguniform(0.005,0.05)"
            )
        key, kind = m["key"], m["kind"]
        args = [_scalar(a) for a in m["args"].split(",") if a]
        if kind in ("uniform", "loguniform", "randint") and len(args) != 2:
            raise SweepError(f"--space {key}: {kind} takes two bounds, got {args}")
        if kind in ("choice", "grid") and not args:
            raise SweepError(f"--space {key}: {kind} needs at least one value")
        space[key] = {
            "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a),
            "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a),
        }[kind](args)
    return space


def _overrides(params: dict[str, Any]) -> list[str]:
    return [f"{key}={value}" for key, value in params.items()]


def trial_preset(base: str, base_overrides: list[str], params: dict[str, Any]) -> Preset:
    """The preset of one trial: the base preset, the user's overrides, then the sampled values."""
    preset = load_preset(base, [*base_overrides, *_overrides(params)])
    # One Tune iteration = one report: report exactly at evaluation steps so every result has val/bpb.
    preset.pretrain.report_every = max(1, preset.pretrain.eval_every)
    return preset


def _trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one real training run through the shared loop."""

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from nanochat.train.trainer import train_stage

    params = {k: v for k, v in config.items() if not k.startswith("_")}
    preset = trial_preset(config["_preset"], config["_overrides"], params)
    trial_id = tune.get_context().get_trial_id()
    train_stage(
        "pretrain",
        preset,
        tag=f"tune-{trial_id}",
        run_name=f"tune-{trial_id}",  # deterministic: a retried trial restores its own run
        callbacks=[TuneReportCallback()],
        export=False,
        base=config["_base_dir"],  # trials run in Ray workers: the sweep's artifacts root, passed down
    )


@dataclass
class SweepResult:
    out_dir: Path
    best_params: dict[str, Any]
    best_bpb: float
    best_preset: Path
    table: Path
    plot: Path
    num_trials: int
    num_stopped_early: int


def _per_trial_resources(preset: Preset) -> tuple[dict[str, float], int]:
    """A trial's Train workers come from the inner ScalingConfig; size concurrency from the cluster."""
    import ray

    cluster = ray.cluster_resources()
    workers = preset.ray.num_workers
    use_gpu = preset.ray.use_gpu if preset.ray.use_gpu is not None else cluster.get("GPU", 0) > 0
    if use_gpu:
        concurrent = int(cluster.get("GPU", 0) // workers)
    else:
        per_trial_cpu = 0.1 + workers * preset.ray.cpus_per_worker
        concurrent = int(cluster.get("CPU", 1) // per_trial_cpu)
    if concurrent < 1:
        raise SweepError(
            f"the cluster ({cluster.get('CPU', 0)} CPUs, {cluster.get('GPU', 0)} GPUs) cannot fit one trial of "
            f"{workers} worker(s): lower ray.num_workers / ray.cpus_per_worker"
        )
    return {"CPU": 0.1}, concurrent  # the trial itself is only a driver; 0 CPU is refused by Ray


def run_sweep(
    preset_name: str = "tiny",
    overrides: list[str] | None = None,
    space: list[str] | None = None,
    num_samples: int = 4,
    searcher: str = "random",
    grace_period: int = 1,
    name: str = "sweep",
    max_concurrent: int | None = None,
    base: str | os.PathLike | None = None,
) -> SweepResult:
    """Run an ASHA sweep on ``val/bpb``; write results.csv, a plot and the best config as a preset
    under ``<base>/tune/<name>`` (``base``: the artifacts root, default ``$NANOCHAT_BASE_DIR``)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    overrides = overrides or []
    base_preset = load_preset(preset_name, overrides)
    param_space = parse_space(space or DEFAULT_SPACE)
    for key in param_space:  # every key must be a real preset field: check before any trial starts
        sample = {key: _first_value(param_space[key])}
        trial_preset(preset_name, overrides, sample)
    resources, concurrent = _per_trial_resources(base_preset)
    concurrent = min(concurrent, max_concurrent or concurrent)
    num_reports = max(1, base_preset.pretrain.num_iterations // max(1, base_preset.pretrain.eval_every))
    scheduler = ASHAScheduler(
        time_attr="training_iteration", max_t=num_reports, grace_period=grace_period, reduction_factor=2
    )
    search_alg = _searcher(searcher)
    base = base_dir(base)
    out_dir = base / "tune" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    tuner = tune.Tuner(
        tune.with_resources(_trial, resources),
        param_space={**param_space, "_preset": preset_name, "_overrides": overrides, "_base_dir": str(base)},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(name=name, storage_path=str(base / "ray_results"), verbose=1),
    )
    log.info(
        "sweep %s: %d trials, %d at a time, ASHA on %s over %d reports",
        name,
        num_samples,
        concurrent,
        METRIC,
        num_reports,
    )
    results = tuner.fit()
    return _write_outputs(results, base_preset, preset_name, overrides, list(param_space), num_reports, out_dir)


def _first_value(domain: Any) -> Any:
    if isinstance(domain, dict) and "grid_search" in domain:
        return domain["grid_search"][0]
    return domain.sample() if hasattr(domain, "sample") else domain


def _searcher(kind: str):
    if kind == "random":
        return None
    if kind == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:
            raise SweepError("--searcher optuna needs optuna: pip install optuna") from err
        return OptunaSearch()
    if kind == "hyperopt":
        try:
            from ray.tune.search.hyperopt import HyperOptSearch
        except ImportError as err:
            raise SweepError("--searcher hyperopt needs hyperopt: pip install hyperopt") from err
        return HyperOptSearch()
    raise SweepError(f"unknown searcher '{kind}': choose random, optuna or hyperopt")


def _write_outputs(
    results,
    base: Preset,
    preset_name: str,
    overrides: list[str],
    keys: list[str],
    num_reports: int,
    out_dir: Path,
) -> SweepResult:
    rows = []
    for r in results:
        history = r.metrics_dataframe if r.metrics_dataframe is not None else None
        reports = 0 if history is None else len(history)
        bpb = (r.metrics or {}).get(METRIC, math.nan)
        if history is not None and METRIC in history and len(history[METRIC].dropna()):
            bpb = float(history[METRIC].dropna().min())
        row = {k: r.config.get(k) for k in keys}
        row.update(
            {
                METRIC: bpb,
                "reports": reports,
                "stopped_early": reports < num_reports,
                "error": str(r.error or ""),
            }
        )
        rows.append((r, row, history))
    ok = [(r, row, h) for r, row, h in rows if not row["error"] and not math.isnan(row[METRIC])]
    if not ok:
        errors = "; ".join(row["error"] for _, row, _ in rows if row["error"])[:2000]
        raise SweepError(f"no trial finished with a {METRIC}: {errors or 'no results'}")
    best_r, best_row, _ = min(ok, key=lambda t: t[1][METRIC])
    table = out_dir / "results.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0][1]))
        writer.writeheader()
        for _, row, _ in rows:
            writer.writerow(row)
    best_params = {k: best_row[k] for k in keys}
    best = load_preset(preset_name, [*overrides, *_overrides(best_params)])
    best.name = f"{base.name}-tuned"
    best.description = f"best of sweep '{out_dir.name}' ({METRIC}={best_row[METRIC]:.4f}): {best_params}"
    best_preset = out_dir / "best_preset.yaml"
    atomic_write_text(best_preset, dump_preset(best))
    plot = out_dir / "val_bpb.png"
    _plot(rows, plot)
    stopped = sum(1 for _, row, _ in rows if row["stopped_early"])
    log.info("best %s=%.4f with %s; preset written to %s", METRIC, best_row[METRIC], best_params, best_preset)
    return SweepResult(
        out_dir, best_params, float(best_row[METRIC]), best_preset, table, plot, len(rows), stopped
    )


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for _r, row, history in rows:
        if history is None or METRIC not in history:
            continue
        h = history.dropna(subset=[METRIC])
        x = h["step"] if "step" in h else range(1, len(h) + 1)
        label = ", ".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in row.items()
            if k not in (METRIC, "reports", "stopped_early", "error")
        )
        ax.plot(list(x), list(h[METRIC]), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(METRIC)
    ax.set_title("sweep: validation bpb per trial (ASHA stops the worst early)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
