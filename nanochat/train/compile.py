"""``torch.compile`` in the training loop: when to use it, how, and what it did.

What is compiled (``TrainSettings.compile``): the model's training forward and backward, through
DeepSpeed's ``engine.compile()`` (it calls ``nn.Module.compile`` in place, so parameter names, the
checkpoint format and ``engine.module`` stay as they are), with ``dynamic=False`` because every
training micro-batch has the same shape (packed rows of T tokens in pretraining and mid-training,
SFT rows right-padded to T); and Muon's Newton-Schulz step
(:func:`nanochat.train.optim.compiled_orthogonalize`, one graph per stack of same-shape matrices), as nanochat
compiles both. Evaluation, sampling (KV-cache decoding) and SFT letter accuracy change shape from
call to call, so they run eager (:func:`eager`).

``compile: auto`` turns it on when all of these hold:

* ZeRO stage < 3: ZeRO-3 gathers parameters in module hooks that torch cannot trace, so the graph
  breaks at every layer (measured: 16 graphs for a 2-layer model, the recompile limit hit in
  DeepSpeed's hooks, no gain). ``compile: true`` still compiles there (same losses, no speed-up).
* at least :data:`COMPILE_MIN_EAGER_S` seconds of eager training are left (:func:`eager_seconds`:
  the steps left times the model's FLOPs per step over the worker's peak FLOP/s, measured on CPU,
  at :data:`EAGER_MFU`): a cold compile of the ``tiny`` model cost ~40 s on the 2-core CPU (~7 s
  with the on-disk cache warm) and a compiled forward+backward is ~1.5x faster, so compiling pays
  back after ~2 minutes of training. Tiny test runs stay eager; the ``tiny`` preset compiles.
* the backend works on this worker (:func:`backend_error`: a tiny forward and backward compiled
  for real; a CPU needs a C++ compiler and Python headers, a GPU Triton). If not, the run goes on
  eager with a warning; a graph that fails to compile later also falls back to eager
  (``torch._dynamo.config.suppress_errors``), never stopping the run.

The on-disk caches (inductor's FX-graph cache and the AOTAutograd cache) live in
``$TORCHINDUCTOR_CACHE_DIR``, which :func:`nanochat.ray_utils.worker_env` sets for every Ray
worker (default ``$NANOCHAT_BASE_DIR/cache/torch_compile``): a resumed or repeated run, or the next
stage at the same shape, loads the generated code instead of compiling it again (Dynamo still
traces the model in each new process, a few seconds).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

COMPILE_KWARGS: dict[str, Any] = {"dynamic": False}
COMPILE_MIN_EAGER_S = 120.0
EAGER_MFU = 0.3  # eager training's fraction of the matmul peak (bench_train: 0.29 for `tiny`, 2 cores)

_PROBED: dict[str, str | None] = {}


def eager_seconds(steps_left: int, tokens_per_step: int, flops_per_token: float, peak_flops: float) -> float:
    """Estimated seconds of eager training left on one worker (``tokens_per_step``: that worker's share)."""
    return steps_left * tokens_per_step * flops_per_token / max(peak_flops * EAGER_MFU, 1.0)


def resolve_compile(setting: bool | Literal["auto"], zero_stage: int, eager_s_left: float) -> tuple[bool, str]:
    """Whether to compile, and why (logged): ``setting`` is ``TrainSettings.compile``; ``eager_s_left``
    from :func:`eager_seconds`."""
    if setting is True or setting is False:
        return setting, f"compile: {str(setting).lower()}"
    if zero_stage == 3:
        return False, "compile auto: off under ZeRO-3 (its parameter hooks break the graph at every layer)"
    if eager_s_left < COMPILE_MIN_EAGER_S:
        return False, (f"compile auto: off, ~{eager_s_left:.0f} s of training left (< {COMPILE_MIN_EAGER_S:.0f} s: "
                       "compiling would cost more than it saves)")
    return True, f"compile auto: on (~{eager_s_left:.0f} s of eager training left)"


def _probe(t: torch.Tensor) -> torch.Tensor:
    return (t * t + 1.0).sum()


def backend_error(device: torch.device | str) -> str | None:
    """``None`` when inductor compiles a forward and backward on ``device`` here, else the reason.

    Compiles one tiny function for real (cached per process; seconds the first time on a cold
    cache, well under one with it warm).
    """
    key = str(device)
    if key not in _PROBED:
        try:
            t = torch.ones(8, device=device, requires_grad=True)
            torch.compile(_probe, dynamic=False)(t).backward()
            _PROBED[key] = None
        except Exception as err:  # noqa: BLE001 - any failure means: train eager
            lines = str(err).strip().splitlines()
            _PROBED[key] = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return _PROBED[key]


def compile_training(engine, optimizer, device: torch.device) -> str | None:
    """Compile ``engine``'s module (in place) and the Muon step; returns why not when it could not."""
    err = backend_error(device)
    if err is not None:
        return err
    import torch._dynamo
    import torch._inductor.config

    from nanochat.train.optim import MuonAdamW

    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eager
    if device.type == "cpu":
        # Compile in the worker process: a pool of compile workers on a small CPU host competes with
        # training and data for the same cores (cold tiny-model compile: 40 s here vs 147 s with 2).
        torch._inductor.config.compile_threads = 1
    engine.compile(compile_kwargs=dict(COMPILE_KWARGS))
    if isinstance(optimizer, MuonAdamW):
        optimizer.compiled = True
    return None


def eager():
    """Context manager: run compiled modules eagerly inside (evaluation, sampling)."""
    return torch.compiler.set_stance("force_eager")


def compile_stats() -> dict[str, int]:
    """Process-wide compile counters: graphs compiled (a recompilation adds one), on-disk cache hits/misses."""
    from torch._dynamo.utils import counters

    return {
        "compile/graphs": counters["stats"]["unique_graphs"],
        "compile/fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
        "compile/fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
        "compile/aot_cache_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "compile/aot_cache_miss": counters["aot_autograd"]["autograd_cache_miss"],
    }
