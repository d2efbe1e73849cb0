"""Training metrics as Ray metrics, and where a node's Prometheus endpoint is.

Every process of a Ray cluster records metrics through its node's metrics agent, which serves them
in Prometheus text format at ``http://<node>:<metrics_export_port>/metrics`` (the port is in
``ray.nodes()``; ``ray metrics launch-prometheus`` scrapes every node of a cluster). Ray prefixes
every name with ``ray_``: :data:`TRAIN_GAUGES` ``nanochat_train_loss`` is scraped as
``ray_nanochat_train_loss``. The server's metrics live with the server
(:class:`nanochat.serve.http_api.Metrics`); ``deploy/grafana/nanochat.json`` charts both.
"""

from __future__ import annotations

from typing import Any

# metrics.jsonl key → (gauge name, description). Tags: stage (base|mid|sft), run (<stage>-<tag>).
TRAIN_GAUGES: dict[str, tuple[str, str]] = {
    "train/loss": ("nanochat_train_loss", "training loss (EMA, nats per token)"),
    "train/lr_mult": ("nanochat_train_lr_multiplier", "learning-rate schedule multiplier of every base LR"),
    "train/tok_per_sec": ("nanochat_train_tokens_per_second", "training throughput, all workers (tokens/s)"),
    "train/mfu": ("nanochat_train_mfu", "model FLOPs utilization (fraction of the device's peak)"),
    "train/data_wait_frac": ("nanochat_train_data_wait_fraction", "fraction of step time spent waiting for data"),
    "worker/cpu_cores": ("nanochat_train_worker_cpu_cores", "CPU cores rank 0's worker process kept busy (CPU s per s)"),
    "val/bpb": ("nanochat_train_val_bpb", "validation bits per byte (pretraining)"),
    "val/loss": ("nanochat_train_val_loss", "validation loss (nats per token)"),
    "step": ("nanochat_train_step", "optimizer steps done"),
}
TRAIN_TAGS = ("stage", "run")


class TrainGauges:
    """The :data:`TRAIN_GAUGES` of one process; :meth:`record` sets those a report carries.

    The trainer's driver records every report it follows in metrics.jsonl (the process that called
    ``train_stage``), so one process exports each run's values. A gauge keeps its last value until
    the next report, and is scrapeable as long as that process lives (Ray drops a dead process's
    metrics at once).
    """

    def __init__(self) -> None:
        from ray.util.metrics import Gauge

        self.gauges = {key: Gauge(name, description=text, tag_keys=TRAIN_TAGS)
                       for key, (name, text) in TRAIN_GAUGES.items()}

    def record(self, report: dict[str, Any], stage: str, run: str) -> None:
        tags = {"stage": stage, "run": run}
        for key, gauge in self.gauges.items():
            value = report.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value == value:  # not NaN
                gauge.set(float(value), tags=tags)


def metrics_endpoints() -> list[str]:
    """``http://<ip>:<port>/metrics`` of every alive node of the connected Ray (Prometheus format)."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
