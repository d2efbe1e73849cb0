"""The RL learner: the policy under DeepSpeed on each Ray Train worker, nanochat's optimizer groups, the step.

Every worker of the learner's ``TorchTrainer`` (:mod:`nanochat.rl.loop`) builds one :class:`Learner`:
the policy wrapped by ``deepspeed.initialize`` (ZeRO 0-3 as the ``sft`` section sets it) around the
shared optimizer groups (:func:`nanochat.train.optim.build_optimizer`: MuonAdamW or AdamW at
``rl.init_lr_frac`` of the SFT rates), the same DeepSpeed config builder as the pretrain/SFT loop
(:func:`nanochat.train.loop.deepspeed_config`) and the same checkpoint pieces
(:mod:`nanochat.train.checkpointing`). Every :meth:`Learner.train_step` advances the weights version
by one; :meth:`Learner.publish` puts the new weights in the object store once (rollout actors load
them from there).

One RL step is one optimizer step over however many micro-batches of ``rl.device_batch_size`` live
rows it has (rows of zero advantage are skipped): DeepSpeed runs with ``gradient_accumulation_steps
= 1`` and the accumulation boundary set by hand on the step's last micro-batch
(``set_gradient_accumulation_boundary``), then one ``engine.step()``.

Data parallel: every rank gets the whole step's groups; rank ``r`` trains on live rows ``r::world``.
Every rank runs the same number of micro-batches (the most any rank needs; a rank with fewer runs
one-token forwards with zero loss), because ZeRO-3 gathers parameters in every forward; each rank's
loss is multiplied by ``world`` because DeepSpeed averages gradients over ranks, which makes the
summed gradient exactly that of the formula in :mod:`nanochat.rl.loss`.

Checkpoints are ordinary ``checkpoints/rl/<tag>/step_N`` model checkpoints (``nanochat chat``/``eval
chat`` load them) whose ``meta.json`` ``extra.rl`` records the step, weights version, questions seen
and learner world size, plus DeepSpeed's optimizer state in ``<tag>/optim/step_N/`` written by every
rank before rank 0 writes the model directory (written atomically, it is what marks a checkpoint
complete).
"""

from __future__ import annotations

import shutil
import time
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nanochat.checkpoint import load_checkpoint, save_checkpoint, step_name
from nanochat.config import RLSettings, TrainSettings
from nanochat.rl.loss import group_advantages, reinforce_loss, token_logprobs
from nanochat.rl.rollout import Group

OPTIM_DIR = "optim"


def optimizer_dir(tag_dir: str | Path, step: int) -> Path:
    """Where the DeepSpeed state (optimizer, ZeRO shards) of checkpoint ``step`` lies."""
    return Path(tag_dir) / OPTIM_DIR / step_name(step)


def learner_settings(rl: RLSettings, sft: TrainSettings) -> TrainSettings:
    """The SFT section with RL's optimizer, LR fraction, micro-batch and clipping (what the learner trains with)."""
    return sft.model_copy(update={"init_lr_frac": rl.init_lr_frac, "optimizer": rl.optimizer,
                                  "device_batch_size": rl.device_batch_size, "grad_clip": rl.grad_clip})


def batch_rows(groups: list[Group], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a step: ``inputs``, ``targets`` (B, T-1; -1 padding), ``mask`` (B, T-1) and advantages (B,)."""
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float32)
    adv = group_advantages(rewards).reshape(-1)
    samples = [s for g in groups for s in g.samples]
    width = max(len(s.tokens) for s in samples)
    inputs = torch.full((len(samples), width - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), width - 1), -1, dtype=torch.long)
    mask = torch.zeros((len(samples), width - 1))
    for i, s in enumerate(samples):
        n = len(s.tokens) - 1
        inputs[i, :n] = torch.tensor(s.tokens[:-1])
        targets[i, :n] = torch.tensor(s.tokens[1:])
        mask[i, :n] = torch.tensor(s.mask[1:], dtype=torch.float32)
    return inputs, targets, mask, adv


def _max_over_ranks(value: int, device: torch.device) -> int:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


class Learner:
    """The policy under DeepSpeed on one Ray Train worker (needs the process group Ray Train set up)."""

    def __init__(self, checkpoint: str | PathLike, rl: RLSettings, sft: TrainSettings, device: torch.device,
                 rank: int = 0, world: int = 1):
        from deepspeed.utils import logger as ds_logger

        from nanochat.train.loop import deepspeed_engine

        ds_logger.setLevel("WARNING")
        self.device, self.rank, self.world, self.rl = device, rank, world, rl
        ckpt = load_checkpoint(checkpoint, device=device)
        model, self.tokenizer, self.config = ckpt.model, ckpt.tokenizer, ckpt.model.config
        model.train()
        self.settings = learner_settings(rl, sft)
        self.engine, self.optimizer, _ = deepspeed_engine(model, self.settings, torch.float32, 1)
        self.version = 0
        self.step = 0
        self.questions_seen = 0

    def restore(self, optim_dir: str | PathLike, step: int, version: int, questions_seen: int,
                saved_world: int | None) -> None:
        """Continue a run from a checkpoint this learner was built from: DeepSpeed state, counters (every rank).

        Raises:
            RuntimeError: the checkpoint's ZeRO shards were written by another number of learner workers.
        """
        from nanochat.train.checkpointing import TrainState, load_engine_state

        if (Path(optim_dir) / "deepspeed").is_dir():
            load_engine_state(self.engine, optim_dir, TrainState(world_size=saved_world or self.world), self.world,
                              self.settings.zero_stage)
        self.step, self.version, self.questions_seen = step, version, questions_seen

    def weights(self) -> dict[str, torch.Tensor] | None:
        """Full CPU weights on rank 0, None elsewhere (every rank calls it: ZeRO-3 gathers collectively)."""
        from nanochat.train.checkpointing import full_model_state

        return full_model_state(self.engine, self.settings.zero_stage, self.rank)

    def publish(self) -> list[Any] | None:
        """Rank 0: the current weights in the object store, once: ``[ref]`` (a list so Ray passes the ref,
        not the value); None on other ranks. Every rank calls it."""
        import ray

        state = self.weights()
        return [ray.put(state)] if state is not None else None

    def train_step(self, groups: list[Group], num_iterations: int) -> dict[str, float]:
        """One optimizer step on ``groups`` (the whole step's, on every rank; made by weights no older than
        the bound rank 0 checked).

        LR multiplier ``1 - step / num_iterations`` (linear decay to 0, nanochat). Rows whose advantage is
        0 (a group with equal rewards) are not run: their gradient is zero; their tokens still count in the
        normalizer, so the loss is exactly the formula of :mod:`nanochat.rl.loss`.
        """
        from nanochat.train.optim import set_lr

        t0 = time.perf_counter()
        inputs, targets, mask, adv = batch_rows(groups, self.tokenizer.get_bos_token_id())
        num_tokens = float(mask.sum().item())
        lrm = max(0.0, 1.0 - self.step / max(num_iterations, 1))
        set_lr(self.optimizer, lrm)
        live = torch.nonzero(adv != 0).flatten()
        mine = live[self.rank :: self.world]
        size = self.rl.device_batch_size
        chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
        # ZeRO-3 gathers parameters in every forward (collective): every rank runs as many micro-batches.
        count = max(1, int(_max_over_ranks(len(chunks), self.device)))
        loss_total = 0.0
        for i in range(count):
            if i < len(chunks):
                rows = chunks[i]
                used = int(mask[rows].sum(0).nonzero().max().item()) + 1 if mask[rows].sum() > 0 else 1
                x, y = inputs[rows, :used].to(self.device), targets[rows, :used].to(self.device)
                logp = token_logprobs(self.engine(x), y)
                loss = reinforce_loss(logp, mask[rows, :used].to(self.device), adv[rows].to(self.device), num_tokens)
                loss_total += loss.item()
                loss = loss * self.world  # DeepSpeed averages gradients over ranks; the formula sums them
            else:  # nothing (left) for this rank: a one-token forward keeps the ranks in lockstep
                loss = self.engine(inputs[:1, :1].to(self.device)).sum() * 0.0
            # one optimizer step per RL step, however many micro-batches it took: the boundary is set by hand
            self.engine.set_gradient_accumulation_boundary(i == count - 1)
            self.engine.backward(loss)
        self.engine.step()
        loss_total, rows_live = _sum_over_ranks([loss_total, float(len(mine))], self.device)
        self.step += 1
        self.version += 1
        self.questions_seen += len(groups)
        return {"loss": loss_total, "lr_mult": lrm, "train_tokens": num_tokens, "live_rows": rows_live,
                "learner_s": time.perf_counter() - t0, "weights_version": self.version}

    def save(self, tag_dir: str | PathLike, tag: str, metrics: dict[str, Any] | None = None) -> str | None:
        """Checkpoint at the current step (every rank): DeepSpeed state first, then rank 0's model directory
        (atomic). Returns the model directory on rank 0, None elsewhere."""
        from nanochat.train.checkpointing import save_engine_state

        tag_dir = Path(tag_dir)
        folder = optimizer_dir(tag_dir, self.step)
        if self.rank == 0:
            shutil.rmtree(folder, ignore_errors=True)  # what a run killed while saving this step left
            folder.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        save_engine_state(self.engine, folder)
        weights = self.weights()
        path = None
        if self.rank == 0:
            extra = {"rl": {"step": self.step, "weights_version": self.version,
                            "questions_seen": self.questions_seen, "learner_workers": self.world}}
            path = str(save_checkpoint(tag_dir / step_name(self.step), weights, self.config, self.tokenizer, "rl",
                                       self.step, metrics=metrics, extra=extra, tag=tag))
        if dist.is_initialized():
            dist.barrier()
        return path
