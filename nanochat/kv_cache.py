"""The KV cache: keys/values of many sequences in fixed slots, and the two ways a forward uses them.

:class:`KVCache` owns the buffers, ``(n_layer, slots, max_len, n_kv_head, head_dim)`` each, and
one length per slot. A forward pass receives an object with three methods (``begin`` → positions
and attention mask, ``write`` per layer → all keys/values to attend to, ``advance`` after the last
layer); the model (:mod:`nanochat.model`) knows nothing else about it. ``begin``'s positions are a
(B, T) tensor, or an ``int`` when every row starts at that same position (the common case: the
model then slices its rotary table and the cache writes a slice, fewer ops per step).

- :class:`KVCache` itself (or ``rows(a, b)``, a view over slots a..b-1) runs any number of new
  tokens per row at the rows' own lengths: prefill, and the plain decode loop of tests/benchmarks.
- :class:`DecodeView` runs exactly one new token per row at positions given as a tensor, over
  the full buffers, with shapes fixed by ``(rows, keys)`` and no host synchronisation: this is
  the engine's decode step, the shape a compiled (and on GPU, CUDA-graphed) step needs.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values for ``batch`` sequence slots, each with its own length.

    ``rows(a, b)`` returns a view over slots a..b-1 sharing storage, so an engine can prefill one
    new sequence into a free slot while others are decoding. Forward passes through a cache must
    use the same number of new tokens for every row; ``advance`` moves lengths forward after the
    last layer. Raises ``ValueError`` on overflow (``max_len`` positions per slot).
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        max_len: int,
        n_kv_head: int,
        head_dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        _views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        if _views is not None:
            self.k, self.v, self.seqlens = _views
        else:
            shape = (n_layer, batch, max_len, n_kv_head, head_dim)
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
            self.seqlens = torch.zeros(batch, dtype=torch.long, device=device)
        self.max_len = self.k.shape[2]
        self._positions: torch.Tensor | int = 0
        self._used = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def rows(self, start: int, stop: int) -> KVCache:
        return KVCache(0, 0, 0, 0, 0, _views=(self.k[:, start:stop], self.v[:, start:stop], self.seqlens[start:stop]))

    def move_row(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into ``dst`` (used to keep active sequences in a contiguous prefix)."""
        self.copy_prefix(src, dst, int(self.seqlens[src]))

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :length] = self.k[:, src, :length]
        self.v[:, dst, :length] = self.v[:, src, :length]
        self.seqlens[dst] = length

    def begin(self, num_new: int) -> tuple[torch.Tensor | int, torch.Tensor | None]:
        """Prepare one forward of ``num_new`` tokens per row: positions (B, T), or an ``int`` when every
        row starts at that position, and the attention mask (None for one new token per uniform row)."""
        starts = self.seqlens.tolist()  # one host read (the lengths are needed on the host anyway)
        top = max(starts)
        if top + num_new > self.max_len:
            raise ValueError(f"KV cache overflow: {top} + {num_new} > {self.max_len} positions")
        self._used = top + num_new
        if min(starts) == top:
            self._positions = top
            if num_new == 1:
                return top, None  # every cached key is visible to the single new query
            positions = torch.arange(top, top + num_new, device=self.seqlens.device)[None, :]
        else:
            positions = self.seqlens[:, None] + torch.arange(num_new, device=self.seqlens.device)[None, :]
            self._positions = positions
        keys = torch.arange(self._used, device=self.seqlens.device)
        mask = keys[None, None, :] <= positions[:, :, None]  # (B|1, Tq, Tk)
        return self._positions, mask[:, None]  # broadcast over heads

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, T, H, D) keys/values, return all keys/values so far (B, H, Tk, D)."""
        at = self._positions
        if isinstance(at, int):
            self.k[layer, :, at : at + k.shape[1]] = k  # copy_ casts to the cache's dtype
            self.v[layer, :, at : at + k.shape[1]] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.k[layer][rows, at] = k.to(self.k.dtype)
            self.v[layer][rows, at] = v.to(self.v.dtype)
        used = self._used
        return self.k[layer, :, :used].transpose(1, 2), self.v[layer, :, :used].transpose(1, 2)

    def advance(self, num_new: int) -> None:
        self.seqlens += num_new


class DecodeView:
    """One decode step over rows ``0..B-1`` of a cache's full buffers: one new token per row.

    ``pos`` (B,) long: where each row's new token goes (its cached length); ``keys``: how many
    positions attention reads (``> max(pos)``; the full ``max_len`` for a fixed-shape compiled
    step); ``masked=False`` (eager only, every row at ``keys - 1``) skips the mask and writes a
    slice at ``keys - 1`` (``pos`` is unused then and may be None). Lengths are not advanced here
    (the engine owns them). The caller guarantees ``pos < max_len``: there is no check, because a
    check needs the device's values on the host (a sync per step).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None, keys: int, masked: bool = True):
        self.k, self.v, self.pos, self.keys, self.masked = k, v, pos, keys, masked
        self._rows = torch.arange(pos.shape[0], device=pos.device) if masked else None

    def begin(self, num_new: int) -> tuple[torch.Tensor | int, torch.Tensor | None]:
        if not self.masked:
            return self.keys - 1, None
        keys = torch.arange(self.keys, device=self.pos.device)
        return self.pos[:, None], (keys[None, :] <= self.pos[:, None])[:, None, None, :]  # (B, 1, 1, Tk)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the (B, 1, H, D) keys/values at ``pos``; return (B, H, keys, D) to attend to."""
        rows = k.shape[0]
        if not self.masked:  # eager, every row at keys - 1: a slice copy (casts to the cache's dtype)
            kl, vl = self.k[layer, :rows], self.v[layer, :rows]
            kl.select(1, self.keys - 1).copy_(k.select(1, 0))
            vl.select(1, self.keys - 1).copy_(v.select(1, 0))
            return kl[:, : self.keys].transpose(1, 2), vl[:, : self.keys].transpose(1, 2)
        # Index the whole buffer, not the view ``self.k[layer]``: under torch.compile an in-place write
        # into a view of a graph input becomes a copy of the entire cache per layer (measured: batch 16
        # decoded 10x slower than eager), while a write into the input itself stays in place.
        at = (torch.full_like(self.pos, layer), self._rows, self.pos)
        self.k.index_put_(at, k[:, 0].to(self.k.dtype))
        self.v.index_put_(at, v[:, 0].to(self.v.dtype))
        return self.k[layer, :rows, : self.keys].transpose(1, 2), self.v[layer, :rows, : self.keys].transpose(1, 2)

    def advance(self, num_new: int) -> None:
        pass
