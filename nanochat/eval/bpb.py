"""Bits per byte of a model on the validation shard (tokenizer-independent loss).

bpb = summed target nats / (ln 2 x summed target UTF-8 bytes), special-token targets excluded;
the arithmetic lives in :mod:`nanochat.losses` (shared with training's val/bpb). Here: read the
val shard, tokenize documents with BOS prepended, cut the token stream into ``seq_len + 1`` windows
and sum over up to ``max_tokens`` targets.
"""

from __future__ import annotations

from os import PathLike

import pyarrow.parquet as pq
import torch

from nanochat.losses import bits_per_byte, loss_nats_and_bytes


def val_texts(source: str = "builtin", base: str | PathLike | None = None) -> list[str]:
    """Every document of ``source``'s val shard under ``<base>/data`` (default ``$NANOCHAT_BASE_DIR``)."""
    from nanochat.sources.pretrain import list_shards

    return [t for path in list_shards(source, "val", base) for t in pq.read_table(path, columns=["text"])["text"].to_pylist()]


@torch.no_grad()
def evaluate_bpb(model, tokenizer, texts: list[str], max_tokens: int = 65536, batch_size: int = 8,
                 device="cpu") -> dict[str, float]:
    """``{"bpb", "nats", "bytes", "tokens"}`` over the first ``max_tokens`` target tokens of ``texts``."""
    seq = model.config.sequence_len
    stream: list[int] = []
    for ids in tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id()):
        stream += ids
        if len(stream) > max_tokens + seq:
            break
    rows = [stream[i : i + seq + 1] for i in range(0, min(len(stream) - 1, max_tokens), seq)]
    rows = [r for r in rows if len(r) == seq + 1]
    if not rows:
        raise ValueError(f"not enough validation text for one {seq + 1}-token window")
    token_bytes = tokenizer.token_bytes().to(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(rows), batch_size):
        batch = torch.tensor(rows[start : start + batch_size], dtype=torch.long, device=device)
        x, y = batch[:, :-1], batch[:, 1:]
        loss = model(x, targets=y, loss_reduction="none")
        n, b = loss_nats_and_bytes(loss, y, token_bytes)
        nats += n.double()
        nbytes += b
    return {"bpb": bits_per_byte(nats.item(), nbytes.item()), "nats": nats.item(), "bytes": nbytes.item(),
            "tokens": len(rows) * seq}
