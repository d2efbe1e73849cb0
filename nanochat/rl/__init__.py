"""Reinforcement learning after SFT (nanochat's ``chat_rl``): rollout actors + a learner, on Ray.

:mod:`~nanochat.rl.loss` (the REINFORCE objective), :mod:`~nanochat.rl.rewards` (pluggable
``reward(conversation, completion) -> float``), :mod:`~nanochat.rl.rollout` (sampling groups with
the :class:`~nanochat.engine.Engine`), :mod:`~nanochat.rl.learner` (optimizer step, checkpoints),
:mod:`~nanochat.rl.run` (the stage: ``nanochat train rl``). See docs/rl.md.
"""
