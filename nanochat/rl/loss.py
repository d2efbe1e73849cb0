"""nanochat's RL objective: on-policy REINFORCE with a group-mean baseline (its simplified "GRPO").

No KL to a reference model, no PPO ratio or clipping. For one question with samples
``i = 1..G`` and rewards ``r_i``, the advantage is ``A_i = r_i - mean_j r_j`` (no division by the
std). The loss is token-level (DAPO-style): every sampled token ``t`` of every sample contributes
``-A_i * log p(t)`` and the sum is divided by the number of sampled tokens ``N``::

    loss = -(1 / N) * sum_i sum_{t in sampled(i)} A_i * log p_theta(t | prefix)

Prompt tokens and tokens forced by the calculator tool are masked out (not sampled by the policy).
A group whose samples all got the same reward has ``A_i = 0`` for every sample: no gradient.
Source: karpathy/nanochat ``scripts/chat_rl.py`` (see docs/rl.md for the one difference: ``N`` counts
the whole optimizer step's tokens here, nanochat divides per forward pass of one question's samples).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``rewards`` (questions, samples) -> advantages of the same shape: reward minus its row's mean."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (questions, samples), got shape {tuple(rewards.shape)}")
    return rewards - rewards.mean(dim=1, keepdim=True)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets)`` under ``logits`` (B, T, V) -> (B, T); targets of -1 give 0."""
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * (targets >= 0)


def reinforce_loss(logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                   num_tokens: int | float | None = None) -> torch.Tensor:
    """The token-level REINFORCE loss (module docstring).

    Args:
        logprobs: (B, T) log-probabilities of each row's next tokens.
        mask: (B, T) 1 for tokens the policy sampled, 0 for prompt, tool-forced and padding tokens.
        advantages: (B,) one advantage per row (sample).
        num_tokens: the normalizer ``N``; default ``mask.sum()`` (pass the whole step's count when a
            step is split into micro-batches, so their gradients add up to the step's loss).
    Returns:
        A scalar tensor.
    """
    mask = mask.to(logprobs.dtype)
    n = mask.sum() if num_tokens is None else torch.as_tensor(float(num_tokens))
    return -(logprobs * mask * advantages.to(logprobs.dtype).unsqueeze(1)).sum() / n.clamp(min=1.0)
