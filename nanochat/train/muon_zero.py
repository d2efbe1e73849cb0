"""Muon on ZeRO partitions: whole-matrix Newton-Schulz over DeepSpeed's flat fp32 shards.

Under ZeRO 1/2/3 DeepSpeed hands a client optimizer, per parameter group (ZeRO 3: per sub-group),
one flat fp32 tensor: this rank's partition of the group, with the reduced, averaged and clipped
gradient in ``.grad``. Muon's momentum and Nesterov blend are elementwise, so they run on the
partition as it is; only the Newton-Schulz step needs whole matrices. Per step and Muon group:

1. ``buf.lerp_(g, 1 - m)`` and ``u = g.lerp(buf, m)`` on this rank's partition;
2. all-gather ``u`` over the data-parallel group, so every matrix of the group is whole again;
3. orthogonalize: ZeRO 1/2, each rank the matrices its partition holds a piece of (a matrix cut by
   a partition boundary runs on both of its ranks); ZeRO 3 cuts every matrix across all ranks, so
   the matrices are dealt out (largest first, to the least loaded rank) and the updates all-gathered;
4. each rank adds ``-lr * sqrt(max(1, rows/cols)) * update`` to its own pieces.

The result is the ZeRO-0 step on the same gradients (``tests/test_muon_zero.py`` compares both).
Where a matrix lies: ZeRO 1/2 flatten a group in order (with alignment padding) and cut it into
equal partitions; DeepSpeed's per-parameter fragment map (``param._hp_mapping``: the piece's start
in the partition and in the parameter) gives this rank's pieces and where each matrix starts in the
gathered buffer. ZeRO 3 partitions every parameter on its own (``partition_numel()`` =
ceil(numel / world) elements per rank, the last padded) and concatenates a sub-group's pieces in
order. DeepSpeed's own Muon (``optimizer.type: muon``) is not used: see docs/training.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from nanochat.train.optim import MuonAdamW


@dataclass(frozen=True)
class Piece:
    """This rank's piece of matrix ``matrix``: ``numel`` elements from ``param_start`` of the flattened
    matrix, stored from ``part_start`` of the rank's flat partition."""

    matrix: int
    part_start: int
    param_start: int
    numel: int


@dataclass(frozen=True)
class Slot:
    """Matrix ``matrix`` (its index in the optimizer's matrix list) inside the gathered buffer:
    ZeRO 1/2 from ``offset`` of the group's flat buffer; ZeRO 3 ``chunk`` elements from ``offset`` of
    every rank's partition."""

    matrix: int
    shape: tuple[int, int]
    offset: int
    chunk: int = 0


@dataclass
class PartitionLayout:
    """The matrices of one flat ZeRO partition, as this rank sees them."""

    flat: torch.Tensor
    stage: int
    group: Any  # the data-parallel process group
    world: int
    rank: int
    device: torch.device  # where the gather and Newton-Schulz run (the accelerator, also under offload)
    slots: list[Slot]
    pieces: list[Piece]
    owners: dict[int, int] = field(default_factory=dict)  # ZeRO 3: matrix -> rank that orthogonalizes it

    def mine(self) -> list[Slot]:
        """The matrices this rank orthogonalizes."""
        if self.stage == 3:
            return [s for s in self.slots if self.owners[s.matrix] == self.rank]
        return self.slots

    def matrix(self, gathered: torch.Tensor, slot: Slot) -> torch.Tensor:
        rows, cols = slot.shape
        if self.stage == 3:  # gathered: (world, partition): each rank's chunk of the matrix in turn
            chunks = gathered[:, slot.offset:slot.offset + slot.chunk]
            return chunks.reshape(-1)[:rows * cols].view(rows, cols)
        return gathered.view(-1)[slot.offset:slot.offset + rows * cols].view(rows, cols)


def _all_gather(t: torch.Tensor, layout: PartitionLayout) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(layout.world)]
    dist.all_gather(out, t.contiguous(), group=layout.group)
    return out


def _exchange(updates: dict[int, torch.Tensor], layout: PartitionLayout,
              dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """ZeRO 3: each rank's orthogonalized matrices to every rank (one all-gather, padded to the largest)."""
    shares = [[s for s in layout.slots if layout.owners[s.matrix] == r] for r in range(layout.world)]
    sizes = [sum(s.shape[0] * s.shape[1] for s in share) for share in shares]
    mine = [updates[s.matrix].reshape(-1) for s in shares[layout.rank]]
    local = torch.zeros(max(sizes), dtype=dtype, device=layout.device)
    if mine:
        local[:sizes[layout.rank]] = torch.cat(mine)
    out: dict[int, torch.Tensor] = {}
    for share, buf in zip(shares, _all_gather(local, layout)):
        at = 0
        for s in share:
            n = s.shape[0] * s.shape[1]
            out[s.matrix] = buf[at:at + n].view(s.shape)
            at += n
    return out


@torch.no_grad()
def partition_step(opt: MuonAdamW, group: dict[str, Any], layout: PartitionLayout) -> None:
    """One Muon step of ``group`` on the flat partition ``layout.flat`` (collective: every rank calls it)."""
    flat = layout.flat
    grad = flat.grad if flat.grad is not None else torch.zeros_like(flat)  # still join the collectives
    state = opt.state[flat]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(flat)
    buf, momentum = state["momentum_buffer"], group["momentum"]
    buf.lerp_(grad, 1 - momentum)
    u = grad.lerp(buf, momentum) if group["nesterov"] else buf
    # Newton-Schulz starts by casting to ns_dtype: gathering in it (bf16 when training in bf16) changes
    # nothing in the result and halves the traffic and the whole-matrix buffer.
    gathered = _all_gather(u.to(layout.device, opt.ns_dtype), layout)
    gathered = torch.stack(gathered) if layout.stage == 3 else torch.cat(gathered)
    updates: dict[int, torch.Tensor] = {}
    for slot in layout.mine():
        whole = layout.matrix(gathered, slot)
        updates[slot.matrix] = opt.orthogonalized(slot.matrix, whole, group["ns_steps"])
    del gathered
    if layout.stage == 3:
        updates = _exchange(updates, layout, opt.ns_dtype)
    for piece in layout.pieces:
        rows, cols = opt.matrix_shapes[piece.matrix]
        step = updates[piece.matrix].reshape(-1).narrow(0, piece.param_start, piece.numel)
        flat.narrow(0, piece.part_start, piece.numel).add_(
            step.to(flat.device, flat.dtype), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5
        )


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def _stage12_layouts(zero, opt: MuonAdamW) -> list[PartitionLayout]:
    layouts = []
    for i, group in enumerate(zero.optimizer.param_groups):
        if group.get("kind") != "muon":
            continue
        pg = zero.real_dp_process_group[i]
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
        start = rank * int(zero.partition_size[i])
        slots, pieces = [], []
        for p in zero.bit16_groups[i]:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no piece of this matrix in this rank's partition
                continue
            j = opt.matrix_index(p)
            hp, lp = mapping.get_hp_fragment_address(), mapping.lp_fragment_address
            slots.append(Slot(j, opt.matrix_shapes[j], offset=start + hp.start - lp.start))
            pieces.append(Piece(j, part_start=hp.start, param_start=lp.start, numel=hp.numel))
        stage = 2 if zero.partition_gradients else 1
        flat = zero.single_partition_of_fp32_groups[i]
        layouts.append(PartitionLayout(flat, stage, pg, world, rank, _device(), slots, pieces))
    return layouts


def _deal(slots: list[Slot], world: int) -> dict[int, int]:
    """Matrix -> rank, largest first to the least loaded rank (the same on every rank)."""
    load, owners = [0] * world, {}
    for s in sorted(slots, key=lambda s: (-s.shape[0] * s.shape[1], s.matrix)):
        r = min(range(world), key=lambda k: (load[k], k))
        owners[s.matrix] = r
        load[r] += s.shape[0] * s.shape[1]
    return owners


def _stage3_layouts(zero, opt: MuonAdamW) -> list[PartitionLayout]:
    pg = zero.dp_process_group
    rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
    layouts = []
    for sub, params in enumerate(zero.fp16_groups):
        group = zero.optimizer.param_groups[zero.sub_group_to_group_id[sub]]
        if group.get("kind") != "muon" or not params:
            continue
        slots, pieces, offset = [], [], 0
        for p in params:  # the sub-group's flat partition: each parameter's piece in turn
            j, chunk = opt.matrix_index(p), p.partition_numel()
            slots.append(Slot(j, opt.matrix_shapes[j], offset=offset, chunk=chunk))
            numel = min(chunk, p.ds_numel - rank * chunk)
            if numel > 0:
                pieces.append(Piece(j, part_start=offset, param_start=rank * chunk, numel=numel))
            offset += chunk
        layouts.append(PartitionLayout(zero.fp32_partitioned_groups_flat[sub], 3, pg, world, rank, _device(),
                                       slots, pieces, owners=_deal(slots, world)))
    return layouts


def partition_layouts(ds_optimizer, opt: MuonAdamW) -> list[PartitionLayout]:
    """The layouts of ``opt``'s Muon partitions under the ZeRO optimizer ``ds_optimizer`` (what
    ``deepspeed.initialize`` returned); ``[]`` when there is no ZeRO partitioning (ZeRO 0).

    Raises:
        NotImplementedError: a DeepSpeed optimizer wrapper this module does not know.
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if ds_optimizer is opt:
        return []
    if isinstance(ds_optimizer, DeepSpeedZeroOptimizer_Stage3):
        return _stage3_layouts(ds_optimizer, opt)
    if isinstance(ds_optimizer, DeepSpeedZeroOptimizer):
        return _stage12_layouts(ds_optimizer, opt)
    raise NotImplementedError(
        f"MuonAdamW under {type(ds_optimizer).__name__}: only ZeRO stages 0-3 with fp32 master weights are "
        "supported (nanochat trains bf16 by autocast, not DeepSpeed's bf16/fp16 modes)"
    )
