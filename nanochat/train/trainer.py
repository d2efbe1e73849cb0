"""Driver side of a training stage: validate, build datasets, run ``TorchTrainer``, export, summarize.

``train_stage("pretrain" | "midtrain" | "sft", preset, ...)`` is the one Python API that the CLI,
``ray_jobs/*.py``, the pipeline and Tune call. Everything that can be wrong with the request
(config values, batch divisibility, a missing tokenizer, a starting checkpoint of the wrong stage
or tokenizer) fails here, before any Ray worker starts. A rerun with the same stage and tag reuses
the Ray Train run name, so Train V2 restores the latest checkpoint it recorded (same step, same data
position; see :mod:`nanochat.train.resume`); ``restart=True`` starts over. A driver-side callback
appends every report to ``checkpoints/<stage>/<tag>/metrics.jsonl`` (which the driver follows: a progress
bar, Ray metrics), and exports every reported checkpoint's model to
``checkpoints/<stage>/<tag>/step_NNNNNN`` (what ``nanochat chat`` loads; the newest ``keep_checkpoints``
are kept).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from nanochat.checkpoint import CheckpointError, checkpoint_tag, checkpoints_root, find_latest, read_meta
from nanochat.common import NanochatError, atomic_write_text, base_dir, get_logger, root_cause
from nanochat.config import Preset, apply_overrides, load_preset
from nanochat.progress import show_training
from nanochat.stages import Stage, get_stage
from nanochat.train.checkpointing import TrainState, recorded_train_state
from nanochat.train.killpoints import KillPoint, kill_if_due, kill_point
from nanochat.train.metrics import JsonlWriter, format_log_line, read_last_metrics
from nanochat.train.resume import (
    Recorded,
    agree_with_record,
    export_checkpoint,
    forget_run,
    metrics_record,
    read_run_record,
    run_path,
    storage_root,
)
from nanochat.train.scaling import check_elastic, scaling_config, worker_counts
from nanochat.train.schedule import epoch_iterations, grad_accum_steps, pretrain_iterations
from nanochat.train.worker_config import ChatEvaluator, WorkerConfig

log = get_logger(__name__)

# bf16 autocast trains ~2x faster than fp32 on CPUs with native bf16 (avx512_bf16/AMX, where bf16
# matmuls measure ~4x fp32); on CPUs that emulate it, it is slower. Choose it only when clearly faster.
CPU_BF16_MIN_SPEEDUP = 2.0


class TrainError(NanochatError):
    """A training run could not start or did not finish; the message says why and what to do."""


@dataclass
class StageResult:
    stage: str
    tag: str
    checkpoint: str | None
    num_iterations: int
    num_params: int
    wall_seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    metrics_path: str = ""
    summary_path: str = ""
    run_path: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage(name: str) -> Stage:
    try:
        return get_stage(name)
    except ValueError as err:
        raise TrainError(str(err)) from None


# ---- the driver-side callback ---------------------------------------------------------------


def _make_callback(metrics_path: str, export_root: str | None, keep: int, kill_at: KillPoint | None = None):
    from ray.train import UserCallback

    class StageCallback(UserCallback):
        """Runs in the Train controller (on the driver's node): JSONL, model export.

        Ray calls it after its checkpoint manager has recorded the report's checkpoint, so
        everything written here follows Ray's record (a crash in between is repaired on rerun).
        The driver follows the JSONL: progress on its console, Ray metrics (:func:`_follow`).
        """

        def __init__(self) -> None:
            self.writer = JsonlWriter(metrics_path)

        def after_report(self, run_context, metrics, checkpoint) -> None:
            record = metrics_record(dict(metrics[0]) if metrics else {})
            step = int(record.get("step", -1))
            if checkpoint is not None:
                kill_if_due(kill_at, "after_record", step)
            self.writer.write(record)
            if checkpoint is not None:
                kill_if_due(kill_at, "before_export", step)
                if export_root:
                    export_checkpoint(checkpoint, Path(export_root), keep)
                kill_if_due(kill_at, "after_export", step)

    return StageCallback()


# ---- validation and inputs --------------------------------------------------------------------


def _load_base_tokenizer(base: Path):
    from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

    tok_dir = default_tokenizer_dir(base)
    if not (tok_dir / "tokenizer.json").exists():
        raise TrainError(f"no tokenizer at {tok_dir}: train one first with `nanochat tok train --preset <name>`")
    return Tokenizer.load(tok_dir), tok_dir


def resolve_source_checkpoint(stage: str, spec: str | None, tag: str | None,
                              base: str | PathLike | None = None) -> Path:
    """The checkpoint mid/SFT start from: ``--from`` or the latest of the previous stage under ``base``
    (default ``$NANOCHAT_BASE_DIR``); checked."""
    from nanochat.checkpoint import resolve_checkpoint

    base = base_dir(base)
    prev = _stage(stage).source
    if spec:
        path = resolve_checkpoint(spec, base=base)
    else:
        try:
            path = find_latest(prev, tag, base)
        except CheckpointError:
            path = find_latest(prev, base=base)
    found = read_meta(path).get("stage")
    if found != prev:
        raise CheckpointError(
            f"refusing {path}: it is a '{found}' checkpoint, but {_stage(stage).name} starts from a '{prev}' one; "
            f"pass --from a {prev} checkpoint (default: the latest under {checkpoints_root(prev, base)})"
        )
    return path


def _check_tokenizer_matches(src: Path, base: Path) -> None:
    from nanochat.tokenizer import Tokenizer, default_tokenizer_dir

    tok_dir = default_tokenizer_dir(base)
    if not (tok_dir / "tokenizer.json").exists():
        return
    current = Tokenizer.load(tok_dir).fingerprint
    recorded = read_meta(src).get("tokenizer", {}).get("fingerprint")
    if recorded and recorded != current:
        raise CheckpointError(
            f"refusing {src}: it was trained with tokenizer {recorded}, but {tok_dir} holds tokenizer {current}; "
            "use a checkpoint trained with the current tokenizer (or restore the matching tokenizer)"
        )


def build_datasets(stage: str, preset: Preset, tokenizer, tokenizer_dir: Path, skip_rows: int = 0,
                   base: str | PathLike | None = None) -> dict[str, Any]:
    """The stage's Ray datasets ``{"train", "val"}`` from the data builders (shards and task downloads
    under ``base``, default ``$NANOCHAT_BASE_DIR``).

    Pretraining streams the shards endlessly (the horizon is a step count) and starts ``skip_rows``
    rows in when resuming; mid/SFT datasets are finite and the loop re-iterates them per epoch.
    """
    if stage == "base":
        from nanochat.data.pipeline import build_pretrain_datasets

        train_ds, val_ds = build_pretrain_datasets(preset, tokenizer_dir, num_epochs=-1, skip_rows=skip_rows,
                                                   base=base)
    elif stage == "mid":
        from nanochat.data.chat_data import build_midtrain_datasets

        train_ds, val_ds = build_midtrain_datasets(preset, tokenizer, base)
    else:
        from nanochat.data.chat_data import build_sft_datasets

        train_ds, val_ds = build_sft_datasets(preset, tokenizer, base)
    return {"train": train_ds, "val": val_ds} if val_ds is not None else {"train": train_ds}


def _configure_ray_data() -> None:
    """Small blocks so Train's equal split streams (see docs/training.md) instead of waiting for the read."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # one concise log line per report instead of redrawn bars
    if ctx.target_max_block_size is None or ctx.target_max_block_size > 1024 * 1024:
        ctx.target_max_block_size = 256 * 1024


def _num_params(model_config) -> tuple[int, float]:
    import torch

    from nanochat.model import GPT

    with torch.device("meta"):
        model = GPT(model_config)
    return model.num_params(), model.estimate_flops()


# ---- the API ----------------------------------------------------------------------------------


def train_stage(
    stage: str,
    preset: Preset | str = "tiny",
    from_checkpoint: str | None = None,
    tag: str | None = None,
    overrides: list[str] | None = None,
    num_workers: int | None = None,
    datasets: dict[str, Any] | None = None,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    export: bool = True,
    restart: bool = False,
    stop_at_step: int | None = None,
    debug_pid_dir: str | None = None,
    chat_evaluator: ChatEvaluator | None = None,
    base: str | PathLike | None = None,
) -> StageResult:
    """Run one stage on Ray Train + DeepSpeed and return its summary (also written to summary.json).

    ``base``: the artifacts root (tokenizer, shards, checkpoints, the default Ray storage), resolved
    here once (default ``$NANOCHAT_BASE_DIR``) and handed to the workers in their :class:`WorkerConfig`.

    ``chat_evaluator``: SFT's in-loop check at each evaluation when ``sft.chat_eval_problems > 0``
    (the CLI and the pipeline pass :func:`nanochat.eval.chat_eval.letter_accuracy`); without one it
    is skipped.
    """
    spec = _stage(stage)
    stage = spec.checkpoint
    base = base_dir(base)
    if isinstance(preset, str):
        preset = load_preset(preset, overrides)
    elif overrides:
        preset = apply_overrides(preset, overrides)
    if num_workers is not None:
        preset.ray.num_workers = num_workers
    settings = getattr(preset, spec.name)
    world = preset.ray.num_workers
    seq_len = preset.model.sequence_len
    for size in worker_counts(preset):  # every size an elastic run may take keeps the global batch: fails early
        grad_accum_steps(settings.total_batch_size, settings.device_batch_size, seq_len, size)
    check_elastic(preset, settings.zero_stage)

    from nanochat.model import GPTConfig, config_for_depth

    source = None
    if stage == "base":
        if from_checkpoint:
            raise TrainError("pretraining starts from scratch; --from is for midtrain and sft")
        tokenizer, tok_dir = _load_base_tokenizer(base)
        m = preset.model
        model_config = config_for_depth(
            m.depth, tokenizer.vocab_size, sequence_len=m.sequence_len, aspect_ratio=m.aspect_ratio,
            head_dim=m.head_dim, n_kv_head=m.n_kv_head, rope_base=m.rope_base, logit_softcap=m.logit_softcap,
        )
        tag = tag or f"d{m.depth}"
    else:
        from nanochat.tokenizer import Tokenizer

        source = resolve_source_checkpoint(stage, from_checkpoint, tag, base)
        _check_tokenizer_matches(source, base)
        meta = read_meta(source)
        tok_dir = source / "tokenizer"
        tokenizer = Tokenizer.load(tok_dir)
        model_config = GPTConfig(**meta["model_config"])
        tag = tag or checkpoint_tag(source, meta)
    num_params, _ = _num_params(model_config)

    from nanochat.ray_stop import wait_for_earlier_run
    from nanochat.ray_utils import cluster_has_gpus, init_ray, worker_env

    init_ray(num_cpus=preset.ray.num_cpus, base=base)
    import ray.train
    from ray.train.torch import TorchTrainer

    _configure_ray_data()
    stage_dir = checkpoints_root(stage, base) / tag
    metrics_path = stage_dir / "metrics.jsonl"
    storage = storage_root(storage_path or preset.ray.storage_path or str(base / "ray_results"))
    name = run_name or f"{stage}-{tag}"
    run = run_path(storage, name)
    keep = settings.keep_checkpoints
    # A stopped job's run of this name can still report for seconds: read the record, and train, after it ended.
    wait_for_earlier_run(name)
    # Ray's record is the one source of truth for the resume point: the workers get its latest
    # checkpoint from ray.train.get_checkpoint(), the driver reads the same record here.
    record = [] if restart else read_run_record(run)
    resume_state = TrainState()
    if not record:  # nothing recorded: whatever an earlier attempt left is not a resume point
        forget_run(run, stage_dir)
    else:
        resume_state = recorded_train_state(record[-1].checkpoint)
        log.info("resuming %s/%s from the latest checkpoint Ray recorded (step %d) in %s (use --restart to start "
                 "over)", stage, tag, record[-1].step, run)
        agree_with_record(run, record, stage_dir, metrics_path, keep, export)

    dataset_skip_rows = 0
    if datasets is None:
        dataset_skip_rows = resume_state.rows_consumed if stage == "base" else 0
        datasets = build_datasets(stage, preset, tokenizer, tok_dir, skip_rows=dataset_skip_rows, base=base)
    if stage == "base":
        num_iterations = pretrain_iterations(settings.num_iterations, settings.target_param_data_ratio, num_params,
                                             settings.total_batch_size)
    else:
        rows_per_step = settings.total_batch_size // seq_len
        rows = datasets["train"].count() if settings.num_iterations <= 0 else 0
        num_iterations = epoch_iterations(settings.num_iterations, settings.num_epochs, rows, rows_per_step)

    if record and record[-1].step >= num_iterations and stop_at_step is None:
        # Finished = the final checkpoint, with the final evaluation reported alongside, is recorded.
        log.info("%s/%s already finished %d steps (%s); use --restart to train again", stage, tag, num_iterations,
                 record[-1].checkpoint.path)
        return _finish(stage, tag, record[-1], num_iterations, num_params, None, stage_dir, run, preset, source,
                       export, keep)
    (stage_dir / "summary.json").unlink(missing_ok=True)  # the stage is unfinished again until this run ends

    use_gpu = preset.ray.use_gpu if preset.ray.use_gpu is not None else cluster_has_gpus()
    resources = {"CPU": preset.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    cores = os.cpu_count() or 1
    if stage == "sft" and settings.chat_eval_problems > 0 and chat_evaluator is None:
        log.warning("sft.chat_eval_problems=%d, but no chat_evaluator was passed to train_stage: the in-loop "
                    "letter accuracy is skipped", settings.chat_eval_problems)
    cfg = WorkerConfig(
        stage=stage, tag=tag, settings=settings, gpt=model_config, sequence_len=seq_len,
        num_iterations=num_iterations, tokenizer_dir=str(tok_dir), base_dir=str(base),
        task_source=preset.mixture.source, init_checkpoint=str(source) if source else None,
        dtype=resolve_dtype(settings.dtype, use_gpu), threads_per_worker=1 if use_gpu else max(1, cores // world),
        stop_at_step=stop_at_step, debug_pid_dir=debug_pid_dir, dataset_skip_rows=dataset_skip_rows,
        kill_at=kill_point(), chat_evaluator=chat_evaluator,
    )
    env = worker_env(base)
    from nanochat.data import idle_backoff
    from nanochat.data.pipeline import ingest_buffer_bytes, pretrain_data_config

    buffer = ingest_buffer_bytes(world, settings.device_batch_size, seq_len, preset.data.ingest_buffer_mb)
    datasets = {name: idle_backoff.install(ds) for name, ds in datasets.items()}
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=cfg.to_loop_config(),
        scaling_config=scaling_config(preset, use_gpu, resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=preset.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
            callbacks=[_make_callback(str(metrics_path), str(stage_dir) if export else None, keep, cfg.kill_at),
                       *(callbacks or [])],
            worker_runtime_env={"env_vars": env},
        ),
        datasets=datasets,
        # ordered ingest (resume replays exactly the consumed rows); val is not split across workers
        dataset_config=pretrain_data_config(datasets_to_split=["train"], buffer_bytes=buffer),
    )
    log.info("%s/%s: %d steps, %d workers (%s), %.1fM params, ZeRO %d, %s, %s", stage, tag, num_iterations, world,
             "GPU" if use_gpu else "CPU", num_params / 1e6, settings.zero_stage, settings.optimizer, cfg.dtype)
    t0 = time.time()
    try:
        with _follow(spec.name, name, metrics_path, num_iterations, resume_state.step):
            result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - surface worker errors as one clear line
        raise TrainError(f"{stage} training failed: {root_cause(err)} (run dir {run}; every worker's log is in "
                         "Ray's log directory printed at start-up, or rerun with -v)") from err
    # Wall-clock time of the whole stage: this fit plus the training time recorded before the resume point.
    wall = time.time() - t0 + resume_state.train_seconds
    final = Recorded(result.checkpoint, dict(result.metrics or {})) if result.checkpoint else None  # Ray's latest
    return _finish(stage, tag, final, num_iterations, num_params, wall, stage_dir, run,
                   preset, source, export, keep, write_summary=stop_at_step is None or stop_at_step >= num_iterations)


def _finish(stage, tag, latest: Recorded | None, num_iterations, num_params, wall: float | None, stage_dir: Path,
            run: str, preset: Preset, source, export: bool, keep: int, write_summary: bool = True) -> StageResult:
    """Export the latest recorded model (if the callback has not), write summary.json, build the result.

    ``wall=None``: the stage had finished before this call; its summary.json (written when it
    finished) is kept, or, when a crash came before it was written, rebuilt from the record with
    the training time recorded in the final checkpoint.
    """
    metrics_path, summary_path = stage_dir / "metrics.jsonl", stage_dir / "summary.json"
    exported = export_checkpoint(latest.checkpoint, stage_dir, keep, overwrite=False) if export and latest else None
    if wall is None:
        if summary_path.exists():
            wall, write_summary = float(json.loads(summary_path.read_text()).get("wall_seconds") or 0.0), False
        else:
            wall = recorded_train_state(latest.checkpoint).train_seconds if latest else 0.0
    out = StageResult(
        stage=stage, tag=tag, checkpoint=str(exported) if exported else None, num_iterations=num_iterations,
        num_params=num_params, wall_seconds=wall, metrics=read_last_metrics(metrics_path),
        metrics_path=str(metrics_path), summary_path=str(summary_path), run_path=run,
    )
    if write_summary:
        summary = {**out.as_dict(), "config": preset.model_dump(mode="json"),
                   "source_checkpoint": str(source) if source else None}
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str))
    return out


def _follow(stage: str, run: str, metrics_path: Path, total: int, start: int):
    """While ``fit`` runs, every report the callback appends to metrics.jsonl: a progress bar (plain lines
    when not a terminal) and Ray metrics (:class:`~nanochat.metrics_export.TrainGauges`), set from this
    process so their last values stay scrapeable after the run."""
    from nanochat.metrics_export import TrainGauges

    try:
        gauges = TrainGauges()
    except Exception as err:  # noqa: BLE001 - metrics must never stop a training run
        log.warning("training metrics are not exported: %s", err)
        gauges = None
    return show_training(stage, metrics_path, num_iterations=total, start=start, line=format_log_line,
                         also=gauges and (lambda record: gauges.record(record, str(record.get("stage", "")), run)))


def _worker_entry(cfg: dict[str, Any]) -> None:
    from nanochat.train.loop import train_loop_per_worker

    train_loop_per_worker(cfg)


def resolve_dtype(setting: str, use_gpu: bool) -> str:
    """``auto`` = bf16 autocast on GPUs (the worker falls back to fp32 where bf16 is missing); on CPU,
    bf16 where this machine's bf16 matmuls are clearly faster than fp32 (measured here, ~0.1 s), else fp32."""
    if setting != "auto":
        return setting
    if use_gpu:
        return "auto-gpu"
    from nanochat.train.metrics import cpu_bf16_speedup

    speedup = cpu_bf16_speedup()
    choice = "bfloat16" if speedup >= CPU_BF16_MIN_SPEEDUP else "float32"
    log.info("dtype auto on CPU: bf16 matmuls run %.1fx fp32 here -> %s", speedup, choice)
    return choice
