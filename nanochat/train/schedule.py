"""Step arithmetic shared by every stage: LR multiplier, Muon momentum, grad accumulation, horizon.

Pure functions of integers and settings (no torch, no Ray), so they are unit-tested directly.
One LR shape covers all three stages, because each is a setting of the same trapezoid:

- pretrain: ``warmup_ratio`` up, constant, the last ``warmdown_ratio`` linear to ``final_lr_frac``;
- midtrain: no warmup, warmdown 0.2 to 0 (1.0 until 80% of the steps, then linear to 0);
- SFT: warmdown 1.0 to 0 (linear decay from the start), with ``init_lr_frac`` scaling every LR.
"""

from __future__ import annotations

import math

from nanochat.common import NanochatError


class BatchSizeError(NanochatError, ValueError):
    """total_batch_size is not a whole number of micro-batches across the workers."""


def lr_multiplier(
    step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float
) -> float:
    """Multiplier on the initial LRs at optimizer step ``step`` (0-based) of ``num_iterations``."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / max(warmdown, 1)  # 1 at the start of warmdown, 0 at the end
    return progress + (1.0 - progress) * final_lr_frac


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, ramp_steps: int = 300) -> float:
    """nanochat (OCT) warms Muon's momentum from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def grad_accum_steps(total_batch_size: int, device_batch_size: int, sequence_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that one step sees exactly ``total_batch_size`` tokens."""
    per_micro = device_batch_size * sequence_len * world_size
    if total_batch_size % per_micro:
        lo = max(per_micro, total_batch_size // per_micro * per_micro)
        raise BatchSizeError(
            f"total_batch_size={total_batch_size} tokens is not divisible by device_batch_size x sequence_len x "
            f"num_workers = {device_batch_size} x {sequence_len} x {world_size} = {per_micro}; "
            f"use a multiple of {per_micro} (e.g. {lo} or {lo + per_micro}) or change device_batch_size"
        )
    return total_batch_size // per_micro


def pretrain_iterations(num_iterations: int, target_param_data_ratio: float, num_params: int, total_batch_size: int) -> int:
    """Explicit ``num_iterations`` wins; else tokens = ratio x params (Chinchilla-style, all params)."""
    if num_iterations > 0:
        return num_iterations
    if target_param_data_ratio <= 0:
        raise NanochatError("set pretrain.num_iterations > 0 or pretrain.target_param_data_ratio > 0")
    return max(1, int(target_param_data_ratio * num_params) // total_batch_size)


def epoch_iterations(num_iterations: int, num_epochs: float, num_rows: int, rows_per_step: int) -> int:
    """Mid/SFT horizon: explicit ``num_iterations``, else ``num_epochs`` passes over ``num_rows`` rows."""
    if num_iterations > 0:
        return num_iterations
    if num_rows <= 0:
        raise NanochatError("the training dataset is empty: nothing to train on")
    return max(1, math.floor(num_epochs * num_rows / rows_per_step))


def is_due(step: int, every: int, last_step: int) -> bool:
    """Periodic events (eval, sample, save) fire every ``every`` steps and always at the last step."""
    return step == last_step or (every > 0 and step > 0 and step % every == 0)
