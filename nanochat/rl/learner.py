"""The RL learner: one policy copy, nanochat's optimizer groups, the REINFORCE step, checkpoints.

It runs as one Ray actor (:mod:`nanochat.rl.run`). Every :meth:`Learner.train_step` advances the
weights version by one; :meth:`Learner.publish` puts the new weights in the object store once
(rollout actors load them from there). Checkpoints are ordinary ``checkpoints/rl/<tag>/step_N``
model checkpoints (``nanochat chat``/``eval chat`` load them) whose ``meta.json`` ``extra.rl``
records the step, weights version and questions seen, plus the optimizer state in
``<tag>/optim/step_N.pt``, written before the model directory (the model directory, written
atomically, is what marks a checkpoint complete).
"""

from __future__ import annotations

import io
import time
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from nanochat.checkpoint import load_checkpoint, save_checkpoint, step_name
from nanochat.common import atomic_write_bytes
from nanochat.config import RLSettings, TrainSettings
from nanochat.rl.loss import group_advantages, reinforce_loss, token_logprobs
from nanochat.rl.rollout import Group
from nanochat.train.optim import build_optimizer, set_lr

OPTIM_DIR = "optim"


def optimizer_path(tag_dir: str | Path, step: int) -> Path:
    return Path(tag_dir) / OPTIM_DIR / f"{step_name(step)}.pt"


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


class Learner:
    """Policy + optimizer on one device (wrap with ``ray.remote``)."""

    def __init__(self, checkpoint: str | PathLike, rl: RLSettings, sft: TrainSettings, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = load_checkpoint(checkpoint, device=self.device)
        self.model, self.tokenizer, self.rl = ckpt.model, ckpt.tokenizer, rl
        self.model.train()
        settings = sft.model_copy(update={"init_lr_frac": rl.init_lr_frac, "optimizer": rl.optimizer})
        self.optimizer, _ = build_optimizer(self.model, settings, torch.float32)
        self.version = 0
        self.step = 0
        self.questions_seen = 0

    def restore(self, optim_file: str | PathLike | None, step: int, version: int, questions_seen: int) -> None:
        """Continue a run from a checkpoint this learner was built from: optimizer state, counters."""
        if optim_file is not None and Path(optim_file).exists():
            self.optimizer.load_state_dict(torch.load(optim_file, map_location=self.device, weights_only=False))
        self.step, self.version, self.questions_seen = step, version, questions_seen

    def publish(self) -> list[Any]:
        """The current weights in the object store, once: ``[ref]`` (a list so Ray passes the ref, not the value)."""
        import ray

        state = {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}
        return [ray.put(state)]

    def train_step(self, groups: list[Group], num_iterations: int) -> dict[str, float]:
        """One optimizer step on ``groups`` (all made by weights no older than the bound the driver checked).

        LR multiplier ``1 - step / num_iterations`` (linear decay to 0, nanochat). Rows whose advantage is
        0 (a group with equal rewards) are not run: their gradient is zero; their tokens still count in the
        normalizer, so the loss is exactly the formula of :mod:`nanochat.rl.loss`.
        """
        t0 = time.perf_counter()
        pad = self.tokenizer.get_bos_token_id()
        inputs, targets, mask, adv = batch_rows(groups, pad)
        num_tokens = float(mask.sum().item())
        lrm = max(0.0, 1.0 - self.step / max(num_iterations, 1))
        set_lr(self.optimizer, lrm)
        self.optimizer.zero_grad(set_to_none=True)
        live = torch.nonzero(adv != 0).flatten()
        loss_total = 0.0
        for start in range(0, len(live), self.rl.device_batch_size):
            rows = live[start : start + self.rl.device_batch_size]
            used = int(mask[rows].sum(0).nonzero().max().item()) + 1 if mask[rows].sum() > 0 else 1
            x, y = inputs[rows, :used].to(self.device), targets[rows, :used].to(self.device)
            logp = token_logprobs(self.model(x), y)
            loss = reinforce_loss(logp, mask[rows, :used].to(self.device), adv[rows].to(self.device), num_tokens)
            loss.backward()
            loss_total += loss.item()
        if self.rl.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.rl.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.version += 1
        self.questions_seen += len(groups)
        return {"loss": loss_total, "lr_mult": lrm, "train_tokens": num_tokens, "live_rows": float(len(live)),
                "learner_s": time.perf_counter() - t0, "weights_version": self.version}

    def save(self, tag_dir: str | PathLike, tag: str, metrics: dict[str, Any] | None = None) -> str:
        """Checkpoint at the current step: optimizer state first, then the model directory (atomic)."""
        tag_dir = Path(tag_dir)
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        optim_file = optimizer_path(tag_dir, self.step)
        optim_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(optim_file, buf.getvalue())
        extra = {"rl": {"step": self.step, "weights_version": self.version, "questions_seen": self.questions_seen}}
        path = save_checkpoint(tag_dir / step_name(self.step), self.model, self.model.config, self.tokenizer, "rl",
                               self.step, metrics=metrics, extra=extra, tag=tag)
        return str(path)
