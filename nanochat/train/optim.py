"""Optimizers for the shared training loop: nanochat's Muon + AdamW recipe, plain AdamW, DeepSpeed AdamW.

``muon_adamw`` (the default) follows the reference: the 2-D matrices inside transformer blocks use
Muon (Nesterov momentum, then a 5-step Newton-Schulz orthogonalization, step scaled by
``sqrt(max(1, rows/cols))``); the embedding and the head use AdamW with betas (0.8, 0.95), eps
1e-10 and learning rates scaled by ``(d_model/768)^-0.5`` (wider models take smaller steps).
Every group remembers its ``initial_lr`` so the schedule sets ``lr = initial_lr x multiplier``.

The Newton-Schulz step runs in the training compute dtype: bf16 where training autocasts to bf16
(the reference's choice, made for GPUs), fp32 where it trains in fp32 (CPUs that emulate bf16 run
the bf16 iteration ~3x slower than fp32; on a 2-core Xeon without avx512_bf16 it was about half of a
tiny-model step). With ``compile`` on, the loop swaps in :func:`compiled_orthogonalize` (one graph per
input shape; nanochat compiles the same function). Where whole matrices are at hand (ZeRO 0), the
matrices of one shape are orthogonalized together, stacked into one batched iteration: fewer, larger
matmuls (the tiny model's 24 Newton-Schulz chains become 3; its optimizer step took 43 ms instead of
66 ms on 2 AMX Xeon cores), with each matrix's result bit for bit what it gets alone (see
:func:`orthogonalize`).

Muon needs whole matrices, and runs under every ZeRO stage: at ZeRO 0 each rank orthogonalizes
the (all-reduced) gradient of every matrix; under ZeRO 1/2/3, where DeepSpeed hands the optimizer
flat fp32 partitions, :func:`attach_zero` (called once after ``deepspeed.initialize``) tells it
where each matrix lies and :mod:`nanochat.train.muon_zero` regathers whole matrices for the
Newton-Schulz step. A flat partition the optimizer was not told about is an error, never a silent
SGD step. ``ns_counts`` counts the orthogonalizations per matrix (tests and ``optimizer_metrics``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from nanochat.config import TrainSettings
from nanochat.model import GPT

# Quintic Newton-Schulz coefficients that push singular values towards 1 in five steps.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)
ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10


def orthogonalize(grad: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately replace ``grad``'s singular values by 1, computed in ``dtype`` (bf16 like the reference).

    ``grad``: ``(..., rows, cols)``, one matrix or a stack (each normalized on its own); returns the same
    shape in ``dtype``. Tall matrices are worked on as a contiguous transposed copy: then (eager, on CPU,
    measured) a matrix gets the same bits alone as in a stack, so ZeRO 1/2 (a matrix at a time) and
    ZeRO 0 (stacks) take the same steps.
    """
    a, b, c = _NS_COEFFS
    x = grad.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT.contiguous()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


@functools.cache
def compiled_orthogonalize():
    """:func:`orthogonalize` under ``torch.compile`` (fixed shapes: one graph per input shape)."""
    return torch.compile(orthogonalize, dynamic=False)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer with two kinds of groups: ``kind="muon"`` (2-D matrices) and ``kind="adamw"``.

    A single object keeps DeepSpeed's client-optimizer contract (one optimizer, ``param_groups``,
    ``state_dict``) while holding nanochat's split recipe. ``ns_dtype``: the Newton-Schulz dtype;
    ``compiled = True`` runs it through :func:`compiled_orthogonalize`. The matrices are numbered in
    group order (``matrix_shapes``, ``ns_counts``) when the optimizer is built, before ZeRO
    partitions them.

    Raises:
        ValueError: a Muon group holds a parameter that is not a 2-D matrix.
    """

    def __init__(self, groups: list[dict[str, Any]], ns_dtype: torch.dtype = torch.bfloat16):
        self.ns_dtype, self.compiled = ns_dtype, False
        defaults = {"lr": 0.0, "kind": "adamw", "momentum": 0.95, "nesterov": True, "ns_steps": 5,
                    "betas": ADAMW_BETAS, "eps": ADAMW_EPS, "weight_decay": 0.0}
        super().__init__(groups, defaults)
        self.matrix_shapes: list[tuple[int, int]] = []
        self._matrix_ids: dict[int, int] = {}
        for group in self.param_groups:
            if group["kind"] != "muon":
                continue
            # ds_shape: the layer's shape when zero.Init has already partitioned the parameter
            shapes = [tuple(getattr(p, "ds_shape", None) or p.shape) for p in group["params"]]
            bad = [s for s in shapes if len(s) != 2]
            if bad:
                raise ValueError(f"Muon takes 2-D matrices only; got shapes {bad[:3]}")
            for p, shape in zip(group["params"], shapes):
                self._matrix_ids[id(p)] = len(self.matrix_shapes)
                self.matrix_shapes.append(shape)
        self.ns_counts = [0] * len(self.matrix_shapes)
        self._partitions: dict[int, Any] = {}  # id(flat ZeRO partition) -> muon_zero.PartitionLayout
        self._ds_optimizer = None

    def matrix_index(self, param: torch.Tensor) -> int:
        """The number of Muon matrix ``param`` (a parameter this optimizer was built with)."""
        try:
            return self._matrix_ids[id(param)]
        except KeyError:
            raise ValueError("not one of this optimizer's Muon matrices") from None

    def attach_partitions(self, ds_optimizer) -> None:
        """Learn where the Muon matrices lie in ``ds_optimizer``'s ZeRO partitions (no-op at ZeRO 0)."""
        from nanochat.train.muon_zero import partition_layouts

        self._ds_optimizer = ds_optimizer
        self._partitions = {id(layout.flat): layout for layout in partition_layouts(ds_optimizer, self)}

    def _partition(self, p: torch.Tensor):
        layout = self._partitions.get(id(p))
        if (layout is None or layout.flat is not p) and self._ds_optimizer is not None:
            self.attach_partitions(self._ds_optimizer)  # DeepSpeed rebuilt its partitions
            layout = self._partitions.get(id(p))
        if layout is None or layout.flat is not p:
            raise RuntimeError(
                f"MuonAdamW got a flat {tuple(p.shape)} tensor (a ZeRO partition) it cannot map to whole "
                "matrices: call nanochat.train.optim.attach_zero(optimizer) after deepspeed.initialize"
            )
        return layout

    def orthogonalized(self, index: int | list[int], u: torch.Tensor, steps: int = 5) -> torch.Tensor:
        """Newton-Schulz of matrix ``index``'s momentum ``u`` (rows x cols), in ``ns_dtype``; counted.

        A list of ``n`` indices takes their momenta stacked, ``u`` of shape (n, rows, cols): one batched
        orthogonalization (each matrix normalized on its own), returned stacked the same way."""
        ns = compiled_orthogonalize() if self.compiled else orthogonalize
        for i in [index] if isinstance(index, int) else index:
            self.ns_counts[i] += 1
        return ns(u, steps, self.ns_dtype)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        from nanochat.train.muon_zero import partition_step

        momentum = group["momentum"]
        same_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.dim() != 2:  # a flat ZeRO partition of several matrices
                partition_step(self, group, self._partition(p))
            elif p.grad is not None:
                same_shape.setdefault(tuple(p.shape), []).append(p)
        # Whole matrices: those of one shape in one batched Newton-Schulz, the elementwise parts as foreach ops.
        for (rows, cols), params in same_shape.items():
            grads = [p.grad for p in params]
            bufs = [self._momentum_buffer(p) for p in params]
            torch._foreach_lerp_(bufs, grads, 1 - momentum)
            u = torch._foreach_lerp(grads, bufs, momentum) if group["nesterov"] else bufs
            update = self.orthogonalized([self.matrix_index(p) for p in params], torch.stack(u), group["ns_steps"])
            scale = max(1.0, rows / cols) ** 0.5
            torch._foreach_add_(params, update.to(params[0].dtype).unbind(0), alpha=-group["lr"] * scale)

    def _momentum_buffer(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        return state["momentum_buffer"]

    def _adamw_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            if wd:
                p.mul_(1 - lr * wd)
            denom = (exp_avg_sq / (1 - beta2**t)).sqrt_().add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**t))


def dmodel_lr_scale(n_embd: int) -> float:
    """AdamW LRs were tuned at d_model=768; scale them by (d/768)^-0.5 for other widths."""
    return (n_embd / 768) ** -0.5


def muon_adamw_groups(model: GPT, settings: TrainSettings) -> list[dict[str, Any]]:
    """nanochat's recipe as param groups, every LR already multiplied by ``init_lr_frac``."""
    s, frac = dmodel_lr_scale(model.config.n_embd), settings.init_lr_frac
    adamw = {"kind": "adamw", "betas": ADAMW_BETAS, "eps": ADAMW_EPS, "weight_decay": settings.weight_decay}
    groups = [
        {"params": model.matrix_params(), "kind": "muon", "lr": settings.matrix_lr * frac, "name": "matrices"},
        {"params": model.embedding_params(), "lr": settings.embedding_lr * s * frac, "name": "embedding", **adamw},
        {"params": model.head_params(), "lr": settings.unembedding_lr * s * frac, "name": "lm_head", **adamw},
    ]
    covered = sum(p.numel() for g in groups for p in g["params"])
    if covered != model.num_params():
        raise RuntimeError(f"optimizer groups cover {covered} of {model.num_params()} parameters")
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def build_optimizer(
    model: GPT, settings: TrainSettings, compute_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.optim.Optimizer | None, dict | None]:
    """Return ``(client_optimizer, None)`` or ``(None, deepspeed_optimizer_section)``.

    ``compute_dtype``: the training dtype; Muon's Newton-Schulz step runs in it (bf16 or fp32).
    """
    lr = settings.adamw_lr * settings.init_lr_frac
    if settings.optimizer == "muon_adamw":
        ns_dtype = torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32
        return MuonAdamW(muon_adamw_groups(model, settings), ns_dtype=ns_dtype), None
    if settings.optimizer == "adamw":
        opt = torch.optim.AdamW(
            [{"params": list(model.parameters()), "initial_lr": lr}],
            lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=settings.weight_decay,
        )
        return opt, None
    # DeepSpeed's own AdamW (fused CPU Adam / CUDA FusedAdam; compiles an extension the first time).
    section = {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8,
                                           "weight_decay": settings.weight_decay}}
    return None, section


def attach_zero(optimizer) -> None:
    """After ``deepspeed.initialize``: tell a :class:`MuonAdamW` inside ``optimizer`` (what it returned:
    the client optimizer at ZeRO 0, DeepSpeed's ZeRO wrapper at 1-3) where its matrices lie.
    Anything else is left alone."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, MuonAdamW):
        inner.attach_partitions(optimizer)


def optimizer_metrics(optimizer, device: torch.device | str = "cpu") -> dict[str, float]:
    """``muon/ns_min``/``muon/ns_max``: fewest/most Newton-Schulz runs of any Muon matrix so far, summed
    over the data-parallel ranks (collective when distributed: every rank must call it; ``device``: where
    the process group reduces); ``{}`` without Muon.

    Every matrix is orthogonalized once per step at ZeRO 0 (per rank) and 3, and once or twice (cut by a
    partition boundary) at ZeRO 1/2, so after N steps ``ns_min >= N`` (x world at ZeRO 0) shows that
    Newton-Schulz really ran on every matrix.
    """
    import torch.distributed as dist

    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, MuonAdamW) or not inner.ns_counts:
        return {}
    counts = torch.tensor(inner.ns_counts, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return {"muon/ns_min": counts.min().item(), "muon/ns_max": counts.max().item()}


def remember_initial_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Record ``initial_lr`` on groups that lack it (DeepSpeed-built optimizers)."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float, muon_momentum: float | None = None) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
        if muon_momentum is not None and group.get("kind") == "muon":
            group["momentum"] = muon_momentum
