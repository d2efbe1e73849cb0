"""Reinforcement learning after SFT (nanochat's ``chat_rl``): rollout actors + a Ray Train learner.

:mod:`~nanochat.rl.loss` (the REINFORCE objective), :mod:`~nanochat.rl.rewards` (pluggable
``reward(conversation, completion) -> float``), :mod:`~nanochat.rl.rollout` (sampling groups with
the :class:`~nanochat.engine.Engine`), :mod:`~nanochat.rl.learner` (the policy under DeepSpeed:
optimizer step, checkpoints), :mod:`~nanochat.rl.loop` (the Ray Train worker function; rank 0 drives
the rollouts), :mod:`~nanochat.rl.run` (the stage's driver: ``nanochat train rl``). See docs/rl.md.
"""
