"""The GPT: nanochat's DEC-2025 architecture as a plain ``nn.Module``.

Decoder-only transformer with rotary positions (base 10,000, "halves" layout), QK RMSNorm after
RoPE, ReLU² MLPs, parameter-free RMSNorm after the embedding / before each block part / before
the head, no biases, untied embedding and head, GQA through ``n_kv_head``, and a 15·tanh(x/15)
logit softcap computed in fp32. Parameter names equal nanochat's state-dict keys so
checkpoints interchange. This module knows nothing of Ray, DeepSpeed or tokenizers.

With ``kv_cache`` the forward continues cached sequences: attention calls the cache's ``begin`` /
``write`` / ``advance`` (see :mod:`nanochat.kv_cache`, one slot per sequence, each with its own
length, so an engine can add and remove sequences between decode steps).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from nanochat import losses
from nanochat.config import model_dim_for_depth
from nanochat.kv_cache import KVCache


class GPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    rope_base: float = 10000.0
    logit_softcap: float = 15.0
    # The reference computes cos/sin in fp32 and stores them in bf16; keeping that rounding is
    # what makes logits match nanochat to 1e-4. Turn off for (slightly) more exact rotations.
    rotary_bf16: bool = Field(True)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the head matmul efficient and rows divisible for sharding.
        return math.ceil(self.vocab_size / 64) * 64


def config_for_depth(
    depth: int,
    vocab_size: int,
    sequence_len: int = 2048,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    n_kv_head: int | None = None,
    **kwargs,
) -> GPTConfig:
    """The depth dial: ``n_layer = depth``, width ``depth * aspect_ratio`` in whole heads."""
    n_embd = model_dim_for_depth(depth, aspect_ratio, head_dim)
    n_head = n_embd // head_dim
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_kv_head or n_head,
        n_embd=n_embd,
        **kwargs,
    )


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]); x is (B, T, H, D), cos/sin full width (B|1, T, 1, D):
    ``cos`` = [c, c], ``sin`` = [s, -s] (see :class:`RotaryAngles`).

    The same values as nanochat's ``y1 = x1·c + x2·s, y2 = x1·(-s) + x2·c`` bit for bit (each product
    rounds alike and a sum of two terms does not depend on their order) in 4 ops instead of 10: on
    a batch-1 CPU decode step the per-op overhead, not arithmetic, is the cost.
    """
    y = x * cos + x.roll(x.shape[-1] // 2, -1) * sin
    return y if y.dtype == x.dtype else y.to(x.dtype)


class RotaryAngles:
    """cos/sin of one forward's positions at full head width (:func:`apply_rotary`), per compute dtype.

    The tables are stored in bf16 by default; a product of an fp32 activation with a bf16 table is
    computed in fp32 after an exact upcast, so the table is upcast once per forward (not per layer
    and op) and gives the same bits. ``cos``/``sin``: (B|1, T, 1, D/2).
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor):
        self._tables = {cos.dtype: (torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1))}
        self._dtype = cos.dtype

    def get(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self._tables.get(dtype)
        if tables is None:
            promoted = torch.promote_types(self._dtype, dtype)
            cos, sin = self._tables[self._dtype]
            tables = self._tables[dtype] = (cos.to(promoted), sin.to(promoted))
        return tables


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError("n_embd must divide by n_head, and n_head by n_kv_head")
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rotary: RotaryAngles, kv_cache: KVCache | None = None, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = rotary.get(q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm after RoPE
        q = q.transpose(1, 2)
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = kv_cache.write(self.layer_idx, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, rotary, kv_cache=None, mask=None):
        x = x + self.attn(norm(x), rotary, kv_cache, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.padded_vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        # Rotary tables for 10x the context, so generation may run past sequence_len.
        cos, sin = self._rotary_tables(config.sequence_len * 10)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        t = torch.arange(length, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        if self.config.rotary_bf16:
            cos, sin = cos.bfloat16(), sin.bfloat16()
        return cos, sin  # (length, hd/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference init: Linear ~ N(0, fan_in^-1/2 · min(1, sqrt(fan_out/fan_in))), embedding N(0, 1),
        lm_head and both residual projections zero (each block starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        cos, sin = self._rotary_tables(self.cos.shape[0], device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
    ) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` in fp32 after the softcap, or the loss when ``targets`` is given.

        Targets equal to -1 are ignored. With grad enabled the loss is
        :func:`nanochat.losses.softcap_cross_entropy` (same values, no fp32 logits kept for backward);
        without, the reference ops (evaluation's per-token losses stay as they were). With ``kv_cache``
        the tokens continue each row's cached sequence (row b of ``idx`` goes to slot b of the cache).
        """
        B, T = idx.shape
        if kv_cache is None:
            if T > self.cos.shape[0]:
                raise ValueError(f"sequence of {T} tokens exceeds the rotary table ({self.cos.shape[0]})")
            rotary = RotaryAngles(self.cos[None, :T, None, :], self.sin[None, :T, None, :])
            mask = None
        else:
            positions, mask = kv_cache.begin(T)
            if isinstance(positions, int):  # every row starts there: a slice, not a gather
                rotary = RotaryAngles(self.cos[None, positions : positions + T, None, :],
                                      self.sin[None, positions : positions + T, None, :])
            else:
                rotary = RotaryAngles(self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :])
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, rotary, kv_cache, mask)
        x = norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self.lm_head(x)
        if logits.shape[-1] != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        cap = self.config.logit_softcap
        if targets is not None and torch.is_grad_enabled():  # training: a loss that keeps no fp32 logits
            return losses.softcap_cross_entropy(logits, targets, cap, loss_reduction)
        if logits.dtype != torch.float32:
            logits = logits.float()
        if torch.is_grad_enabled():
            logits = cap * torch.tanh(logits / cap)
        else:  # inference: the same ops in place (the head's output is ours to overwrite)
            logits = logits.div_(cap).tanh_().mul_(cap)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction
        )

    def new_kv_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        weight = self.lm_head.weight
        return KVCache(
            c.n_layer,
            batch,
            max_len or c.sequence_len,
            c.n_kv_head,
            c.head_dim,
            device=weight.device,
            dtype=dtype or weight.dtype,
        )

    # ---- accounting -----------------------------------------------------------------------

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward): 6·(params − embedding) + 12·L·H·hd·T."""
        c = self.config
        nparams_no_embedding = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * nparams_no_embedding + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    def matrix_params(self) -> list[nn.Parameter]:
        """The 2-D weights inside transformer blocks (Muon's share in the default recipe)."""
        return [p for p in self.transformer.h.parameters()]

    def embedding_params(self) -> list[nn.Parameter]:
        return [self.transformer.wte.weight]

    def head_params(self) -> list[nn.Parameter]:
        return [self.lm_head.weight]


def build_model(config: GPTConfig, device: torch.device | str = "cpu", init: bool = True) -> GPT:
    """Build on the meta device, materialize on ``device``, then initialize (cheap for big models)."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if init:
        model.init_weights()
    else:  # weights will be loaded; the rotary buffers still need real values
        cos, sin = model._rotary_tables(model.cos.shape[0], device=device)
        model.cos.copy_(cos)
        model.sin.copy_(sin)
    return model
