"""Where and how many training workers run: fixed or elastic worker counts, placement across nodes.

``preset.ray`` (:class:`nanochat.config.RaySettings`) becomes Ray Train's ``ScalingConfig`` here. The
guarantees (what a lost node costs, where the data resumes) are in docs/training.md, "Multi-node".
"""

from __future__ import annotations

from nanochat.config import ConfigError, Preset


def is_elastic(preset: Preset) -> bool:
    """Whether the run may resize: ``min_workers`` set below ``num_workers``."""
    return preset.ray.min_workers is not None and preset.ray.min_workers < preset.ray.num_workers


def worker_counts(preset: Preset) -> list[int]:
    """The worker counts a run may train with: ``num_workers``, or every size from ``min_workers`` up."""
    ray_cfg = preset.ray
    low = ray_cfg.num_workers if ray_cfg.min_workers is None else ray_cfg.min_workers
    return list(range(low, ray_cfg.num_workers + 1))


def check_elastic(preset: Preset, zero_stage: int) -> None:
    """Elastic runs resume with another worker count, which only a world-size-free checkpoint allows."""
    if not is_elastic(preset):
        return
    if zero_stage > 0:
        raise ConfigError(
            f"elastic training (ray.min_workers={preset.ray.min_workers} < ray.num_workers={preset.ray.num_workers}) "
            f"needs zero_stage 0: ZeRO {zero_stage} checkpoints hold optimizer shards for one worker count "
            "and a resized run could not load them; set zero_stage=0 or a fixed worker count (unset ray.min_workers)"
        )
    if preset.ray.max_failures == 0:
        raise ConfigError("elastic training resizes by restarting from the latest checkpoint after a failure: "
                          "set ray.max_failures >= 1 (or -1)")


def scaling_config(preset: Preset, use_gpu: bool, resources: dict[str, float]):
    """Ray Train's ``ScalingConfig`` from ``preset.ray``: fixed or elastic ``(min, max)`` workers, placement.

    Elastic (``min_workers`` set): Train V2 starts once ``min_workers`` fit, restarts the group from the
    latest checkpoint with fewer workers when a node is lost, and grows it again (checking every
    ``ray.elastic_resize_s`` seconds) when resources return; every worker count keeps ``total_batch_size``
    tokens per step because the workers derive their gradient accumulation from the world size they start
    with.
    """
    import ray.train

    ray_cfg = preset.ray
    elastic = is_elastic(preset)
    extra = {"elastic_resize_monitor_interval_s": ray_cfg.elastic_resize_s} if elastic else {}
    return ray.train.ScalingConfig(
        num_workers=(ray_cfg.min_workers, ray_cfg.num_workers) if elastic else ray_cfg.num_workers,
        use_gpu=use_gpu, resources_per_worker=resources, placement_strategy=ray_cfg.placement_strategy, **extra,
    )
