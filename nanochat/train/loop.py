"""The one per-worker training function for pretrain, midtrain and SFT (run by Ray Train).

Each worker builds the model, wraps it with ``deepspeed.initialize`` (ZeRO 0-3, optional CPU
offload) on the process group Ray Train already set up (gloo on CPU, NCCL on GPU), streams its
shard of the ``train`` dataset, and steps the optimizer every ``grad_accum`` micro-batches. The
stage is configuration only: the data, the starting weights and the LR shape differ, the loop
does not. What it reports (``ray.train.report``, a barrier every worker calls equally often):
metrics every ``report_every`` steps, at evals and at checkpoints; checkpoints carry the model, the
DeepSpeed state and the :class:`~nanochat.train.checkpointing.TrainState` (layout:
:mod:`nanochat.train.checkpointing`), so a restart resumes at the same step and data position.
Everything the driver decides arrives as one :class:`~nanochat.train.worker_config.WorkerConfig`.

bf16 is autocast over fp32 master weights (as nanochat does), so every optimizer and ZeRO stage
sees ordinary fp32 parameters; DeepSpeed's own bf16 mode is not used. With ``compile`` on, the
training forward/backward and Muon's Newton-Schulz step run compiled (:mod:`nanochat.train.compile`);
evaluation and sampling run the same module eagerly.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat.checkpoint import step_name
from nanochat.common import get_logger
from nanochat.config import TrainSettings
from nanochat.losses import bits_per_byte, loss_nats_and_bytes
from nanochat.train.checkpointing import (
    TrainState,
    batch_digest,
    check_first_batch,
    data_position,
    full_model_state,
    load_engine_state,
    model_dir,
    read_train_state,
    records_next_batch,
    save_engine_state,
    write_train_state,
)
from nanochat.train.compile import compile_stats, compile_training, eager, eager_seconds, resolve_compile
from nanochat.train.compiled_ops import load_compiled_ops
from nanochat.train.killpoints import kill_after_copy, kill_if_due
from nanochat.train.metrics import EMA, Throughput, measure_matmul_flops, peak_flops, peak_rss_mb
from nanochat.train.optim import attach_zero, build_optimizer, optimizer_metrics, remember_initial_lrs, set_lr
from nanochat.train.schedule import grad_accum_steps, is_due, lr_multiplier, muon_momentum
from nanochat.train.worker_config import ChatEvaluator, WorkerConfig

log = get_logger(__name__)

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def deepspeed_engine(model, settings: TrainSettings, dtype: torch.dtype, accum: int):
    """``model`` wrapped by ``deepspeed.initialize`` with the stage's optimizer: ``(engine, optimizer, client_opt)``.

    ``client_opt`` is our optimizer (None when DeepSpeed builds its own AdamW). Loads the compiled ops
    first (:mod:`nanochat.train.compiled_ops`), records the initial LRs and tells Muon where each
    matrix lies in ZeRO's flat partitions. Used by the training loop and the RL learner.
    """
    import deepspeed

    client_opt, ds_opt = build_optimizer(model, settings, dtype)
    load_compiled_ops(("ShareMemCommBuilder", "CPUAdamBuilder") if ds_opt else ("ShareMemCommBuilder",))
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        optimizer=client_opt,
        model_parameters=list(model.parameters()) if ds_opt else None,
        config=deepspeed_config(settings, accum, ds_opt),
    )
    remember_initial_lrs(optimizer)
    attach_zero(optimizer)  # Muon under ZeRO 1-3: where each matrix lies in the flat partitions
    if settings.zero_stage == 0 and engine.dp_world_size == 1:  # its all-reduce would only copy every gradient twice
        engine.enable_backward_allreduce = False
    return engine, optimizer, client_opt


def deepspeed_config(settings: TrainSettings, accum: int, ds_optimizer: dict | None) -> dict[str, Any]:
    """DeepSpeed's JSON config for one stage (fp32 master weights; bf16 comes from autocast)."""
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": settings.device_batch_size,
        "gradient_accumulation_steps": accum,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if settings.grad_clip > 0:
        cfg["gradient_clipping"] = settings.grad_clip
    if ds_optimizer is not None:
        cfg["optimizer"] = ds_optimizer
    return cfg


class TrainData:
    """Micro-batches from this worker's shard, epoch after epoch, counting rows for resume.

    ``first_row``: rows of the epoch the shard already starts past (a pretraining stream rebuilt past
    the consumed rows), so ``rows_in_epoch`` counts from the epoch's start; ``skip_rows``: rows to
    read and drop after that (replaying a finite dataset up to the checkpoint's position);
    ``check_first``: called with the first batch trained (a resumed run checks its data position).
    """

    def __init__(self, shard, batch_size: int, device: torch.device, epoch: int = 0, skip_rows: int = 0,
                 first_row: int = 0, check_first: Callable[[dict[str, torch.Tensor]], None] | None = None):
        self.shard, self.batch_size, self.device = shard, batch_size, device
        self.epoch, self.rows_in_epoch, self.rows_consumed = epoch, first_row, 0
        self._skip = skip_rows
        self._it: Iterator | None = None
        self._check = check_first
        self._peeked: tuple[dict[str, torch.Tensor], bool] | None = None

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True, prefetch_batches=2))

    def _pull(self) -> tuple[dict[str, torch.Tensor], bool]:
        """The next batch and whether it starts a new epoch (the epoch counters move in :meth:`next`)."""
        new_epoch = False
        while True:
            if self._it is None:
                self._it = self._batches()
                while self._skip > 0:  # resume: replay the epoch's consumed rows without training on them
                    next(self._it)
                    self._skip -= self.batch_size
                    self.rows_in_epoch += self.batch_size
            batch = next(self._it, None)
            if batch is not None:
                return batch, new_epoch
            if self.rows_in_epoch == 0 or new_epoch:
                raise RuntimeError("the training dataset yielded no full batch: it has fewer rows than device_batch_size")
            self._it, new_epoch = None, True

    def peek(self) -> dict[str, torch.Tensor]:
        """The batch the next :meth:`next` returns, read now and kept for it (nothing counted)."""
        if self._peeked is None:
            self._peeked = self._pull()
        return self._peeked[0]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, new_epoch = self._peeked or self._pull()
        self._peeked = None
        if new_epoch:
            self.epoch, self.rows_in_epoch = self.epoch + 1, 0
        if self._check is not None:
            check, self._check = self._check, None
            check(batch)
        self.rows_in_epoch += self.batch_size
        self.rows_consumed += self.batch_size
        x = batch["inputs"].to(self.device, dtype=torch.long, non_blocking=True)
        y = batch["targets"].to(self.device, dtype=torch.long, non_blocking=True)
        return x, y


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class Evaluator:
    """Val loss (and bpb) over ``eval_tokens`` of the unsplit val dataset; batches cached after the first pass."""

    def __init__(self, shard, settings: TrainSettings, seq_len: int, token_bytes: torch.Tensor, rank: int, world: int):
        self.shard, self.rank, self.world = shard, rank, world
        self.batch_size = settings.device_batch_size
        wanted = max(1, settings.eval_tokens // (self.batch_size * seq_len))
        self.num_batches = max(world, wanted // world * world)  # equal forwards on every rank (ZeRO-3)
        self.token_bytes = token_bytes
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _my_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self._cache is None:
            mine, seen = [], 0
            for i, b in enumerate(self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=False)):
                if i >= self.num_batches:
                    break
                seen += 1
                if i % self.world == self.rank:
                    mine.append((b["inputs"].long(), b["targets"].long()))
            if seen < self.num_batches:  # a small val split: every rank still needs the same count
                keep = seen // self.world
                mine = mine[:keep]
            self._cache = mine
        return self._cache

    @torch.no_grad()
    def run(self, model: torch.nn.Module, device: torch.device, autocast) -> dict[str, float]:
        model.eval()
        nats = nbytes = loss_sum = count = 0.0
        token_bytes = self.token_bytes.to(device)
        for x, y in self._my_batches():
            x, y = x.to(device), y.to(device)
            with autocast():
                per_token = model(x, y, loss_reduction="none")
            n, b = loss_nats_and_bytes(per_token, y, token_bytes)
            nats, nbytes = nats + n.item(), nbytes + b.item()
            mask = y.reshape(-1) >= 0
            loss_sum += (per_token.reshape(-1).float() * mask).sum().item()
            count += mask.sum().item()
        model.train()
        nats, nbytes, loss_sum, count = _all_reduce_sum([nats, nbytes, loss_sum, count], device)
        return {"val/bpb": bits_per_byte(nats, nbytes), "val/loss": loss_sum / count if count else float("nan")}


@torch.no_grad()
def greedy_samples(model: torch.nn.Module, tokenizer, prompts: list[str], device, max_tokens: int = 16) -> list[str]:
    """Greedy continuations of BOS-prefixed prompts (every rank runs them: ZeRO-3 forwards are collective).

    Uses the inference engine (KV cache, batched) and falls back to plain full-context greedy decoding.
    """
    model.eval()
    ids = [tokenizer.encode(p, prepend=tokenizer.get_bos_token_id()) for p in prompts]
    try:
        from nanochat.engine import Engine, SamplingParams

        engine = Engine(model, tokenizer, max_batch_size=len(prompts), prefix_cache=False)
        done = engine.generate_many(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        model.train()
        return [p + rows[0].text for p, rows in zip(prompts, done)]
    except Exception:  # noqa: BLE001 - an engine problem must not stop training; decode plainly
        pass
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        x = torch.tensor([ids], device=device)
        for _ in range(max_tokens):
            nxt = model(x)[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
        out.append(prompt + tokenizer.decode(x[0, len(ids):].tolist()))
    model.train()
    return out


def chat_accuracy(evaluate: ChatEvaluator, model, tokenizer, device, autocast, problems: int,
                  source: str, base: str) -> dict[str, float]:
    """SFT's progress check: ``evaluate`` (e.g. MMLU/ARC-Easy letter accuracy) as ``val/<name>`` metrics."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        out = evaluate(model, tokenizer, device, problems, source, base)
    model.train(was_training)
    return {f"val/{name}": value for name, value in out.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is a :class:`WorkerConfig`'s ``to_loop_config()`` (built by the driver)."""
    cfg = WorkerConfig.from_loop_config(config)
    import ray.train
    import ray.train.torch
    from deepspeed.utils import logger as ds_logger

    from nanochat.checkpoint import load_checkpoint, save_checkpoint
    from nanochat.common import resolved_dtype
    from nanochat.model import build_model
    from nanochat.tokenizer import Tokenizer

    ds_logger.setLevel("WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # the driver prints one line per report
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.debug_pid_dir:
        Path(cfg.debug_pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.debug_pid_dir) / f"rank_{rank}.pid").write_text(str(os.getpid()))
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.threads_per_worker))
    settings, stage, num_iterations, seq_len = cfg.settings, cfg.stage, cfg.num_iterations, cfg.sequence_len
    dtype = resolved_dtype(cfg.dtype, device)
    tokenizer = Tokenizer.load(cfg.tokenizer_dir)

    torch.manual_seed(settings.seed)
    model = build_model(cfg.gpt, device=device)
    if cfg.init_checkpoint:
        src = load_checkpoint(cfg.init_checkpoint, device="cpu")
        model.load_state_dict(src.model.state_dict())
        del src
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    accum = grad_accum_steps(settings.total_batch_size, settings.device_batch_size, seq_len, world)
    engine, optimizer, client_opt = deepspeed_engine(model, settings, dtype, accum)
    use_autocast = dtype == torch.bfloat16

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()

    # ---- resume -----------------------------------------------------------------------------
    resumed = TrainState()
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            resumed = read_train_state(d)
            load_engine_state(engine, d, resumed, world, settings.zero_stage)
    start_step = resumed.step
    epoch, skip_rows, first_row = data_position(resumed, cfg.dataset_skip_rows, world)
    data = TrainData(ray.train.get_dataset_shard("train"), settings.device_batch_size, device, epoch=epoch,
                     skip_rows=skip_rows, first_row=first_row,
                     check_first=partial(check_first_batch, resumed, world, dataset_skip_rows=cfg.dataset_skip_rows,
                                         replayed_rows=skip_rows))
    data.rows_consumed = resumed.rows_consumed_per_worker
    if resumed.world_size and resumed.world_size != world:  # an elastic resize: the same rows in all, re-divided
        data.rows_consumed = resumed.rows_consumed_per_worker * resumed.world_size // world
    ema = EMA(0.9)
    if resumed.ema is not None:
        ema.load(resumed.ema)
    try:
        val_shard = ray.train.get_dataset_shard("val")
    except Exception:  # noqa: BLE001 - no val dataset given
        val_shard = None
    evaluator = Evaluator(val_shard, settings, seq_len, tokenizer.token_bytes(), rank, world) if val_shard else None
    chat_due = stage == "sft" and settings.chat_eval_problems > 0 and cfg.chat_evaluator is not None and rank == 0
    peak, peak_source = (settings.mfu_peak_flops, "config") if settings.mfu_peak_flops else peak_flops(device, dtype)
    remeasure_peak = peak_source == "measured"
    tokens_per_step = settings.total_batch_size
    stop_at = cfg.stop_at_step
    wall0 = time.time() - resumed.train_seconds
    prompts = SAMPLE_PROMPTS if stage == "base" else []

    kill_at = cfg.kill_at if rank == 0 else None  # test seam, see nanochat.train.killpoints

    def save_and_report(step: int, metrics: dict[str, Any], last: bool) -> None:
        # The next micro-batch's digest (read now, trained next): a resume checks its data position against it.
        next_batch = batch_digest(data.peek()) if records_next_batch(world) and not last else None
        tmp = Path(tempfile.mkdtemp(prefix=f"nanochat-ckpt-{rank}-"))
        save_engine_state(engine, tmp)
        weights = full_model_state(engine, settings.zero_stage, rank)
        if rank == 0:
            save_checkpoint(model_dir(tmp, step), weights, cfg.gpt, tokenizer, stage, step,
                            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            extra={"tag": cfg.tag, "settings": settings.model_dump(mode="json")}, tag=cfg.tag)
            write_train_state(tmp, TrainState(
                step=step, epoch=data.epoch, rows_in_epoch=data.rows_in_epoch,
                rows_consumed_per_worker=data.rows_consumed, rows_consumed=data.rows_consumed * world,
                world_size=world, zero_stage=settings.zero_stage, ema=ema.state(), train_seconds=time.time() - wall0,
                next_batch=next_batch,
            ))
        kill_if_due(kill_at, "before_copy", step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                         checkpoint_dir_name=step_name(step), **kill_after_copy(kill_at, step))
        shutil.rmtree(tmp, ignore_errors=True)

    # ---- torch.compile of the training step (nanochat.train.compile); evaluation stays eager ------
    eager_s = eager_seconds(num_iterations - start_step, tokens_per_step // world, flops_per_token, peak)
    compiled, why = resolve_compile(settings.compile, settings.zero_stage, eager_s)
    if compiled and (failed := compile_training(engine, client_opt, device)):
        compiled, why = False, f"compile off: torch.compile does not work on this worker ({failed}); training eager"
        log.warning(why)
    elif rank == 0:
        log.info(why)

    # ---- the loop: evaluate / sample / save at step boundaries, then train one step ----------
    engine.train()
    meter = Throughput()
    last_mult = lr_multiplier(start_step, num_iterations, settings.warmup_ratio, settings.warmdown_ratio,
                              settings.final_lr_frac)
    step_loss = float("nan")
    for step in range(start_step, num_iterations + 1):
        last = step == num_iterations
        stopping = stop_at is not None and step == stop_at and not last
        metrics: dict[str, Any] = {}
        # A resumed run's first step was evaluated (and sampled) before its checkpoint was reported.
        resumed_here = step == start_step and start_step > 0
        if evaluator is not None and not resumed_here and (is_due(step, settings.eval_every, num_iterations) or step == 0):
            with eager():
                metrics.update(evaluator.run(engine.module, device, autocast))
            if stage != "base":
                metrics.pop("val/bpb", None)
            if chat_due:
                with eager():
                    metrics.update(chat_accuracy(cfg.chat_evaluator, engine.module, tokenizer, device, autocast,
                                                 settings.chat_eval_problems, cfg.task_source, cfg.base_dir))
        if prompts and settings.sample_every != 0 and not resumed_here and is_due(step, settings.sample_every,
                                                                                  num_iterations):
            with eager():
                samples = greedy_samples(engine.module, tokenizer, prompts, device)
            if rank == 0:
                metrics["samples"] = samples
        save_due = step > start_step and (last or stopping or (settings.save_every > 0 and step % settings.save_every == 0))
        report_due = save_due or bool(metrics) or (step > start_step and step % settings.report_every == 0)
        if report_due:
            window = meter.window()
            if step > start_step and remeasure_peak:
                # Measured at start-up, the peak reads low while other workers and data actors start on
                # the same cores (MFU > 100%); a second measurement once training runs keeps the higher.
                peak, remeasure_peak = measure_matmul_flops(device, dtype, fresh=True), False
            if step > start_step:  # a window of training steps lies behind this report
                metrics.update({
                    "train/loss": ema.get(), "train/raw_loss": step_loss, "train/lr_mult": last_mult,
                    "train/tok_per_sec": window["tok_per_sec"] * world,
                    "train/mfu": window["tok_per_sec"] * flops_per_token / peak if peak else 0.0,
                    "train/data_wait_frac": window["data_wait_frac"], "worker/cpu_cores": window["cpu_cores"],
                })
            metrics.update({
                "stage": stage, "step": step, "num_iterations": num_iterations, "time": time.time(),
                "tokens_seen": step * tokens_per_step, "total_flops": step * tokens_per_step * flops_per_token,
                "rows_consumed": data.rows_consumed * world, "epoch": data.epoch, "num_params": num_params,
                "peak_flops_source": peak_source, "train_seconds": time.time() - wall0,
                "compile": int(compiled), **compile_stats(), "worker/peak_rss_mb": peak_rss_mb(),
                **optimizer_metrics(optimizer, device),
            })
            if save_due:
                save_and_report(step, metrics, last)
            else:
                ray.train.report(metrics)
            meter.reset()  # reporting/eval time is not training throughput
        if last or stopping:
            break
        # -- one optimizer step over `accum` micro-batches --
        last_mult = lr_multiplier(step, num_iterations, settings.warmup_ratio, settings.warmdown_ratio,
                                  settings.final_lr_frac)
        set_lr(optimizer, last_mult, muon_momentum(step) if settings.optimizer == "muon_adamw" else None)
        total = torch.zeros((), device=device)
        for _ in range(accum):
            t0 = time.perf_counter()
            x, y = data.next()
            meter.add_wait(time.perf_counter() - t0)
            with autocast():
                loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
            meter.tokens += x.numel()
        step_loss = total.item() / accum
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"loss became {step_loss} at step {step}: lower the learning rates")
        ema.update(step_loss)
