"""Training throughput: our Ray Train + DeepSpeed path vs a plain single-process PyTorch loop.

Same model, same rows, same batch and optimizer (torch AdamW), same threads, in the same run:
the plain loop runs before and after the Ray runs (their mean is the baseline, which cancels
drift on a shared machine); the Ray path runs with 1 worker at ZeRO 0 and ZeRO 2 and reads its
steady-state tokens/s from the reported windows (reporting and eval time excluded, data waits
included). Both run in the dtype ``dtype: auto`` picks on this machine (bf16 autocast on GPUs and on
CPUs with fast bf16). On CPU it also times the plain loop in bf16 autocast vs fp32. The defaults are
the ``tiny`` preset's model shape (depth 4, 256 wide, 256 context). Prints ONE JSON line.

    python benchmarks/bench_train.py [--steps 60] [--depth 4] [--seq 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity. ") * 20


def make_rows(vocab: int, seq: int, n: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab - 9, size=(n, seq + 1))
    return [{"inputs": r[:-1].astype(np.int32), "targets": r[1:].astype(np.int64)} for r in ids]


def plain_loop(model_config, rows, batch: int, steps: int, dtype, lr: float = 3e-3, warmup: int = 3) -> float:
    """Tokens/s of a bare loop: model, AdamW, grad clip, the same rows; timed after ``warmup`` steps."""
    import numpy as np
    import torch

    from nanochat.model import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(model_config, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8)
    x_all = torch.from_numpy(np.stack([r["inputs"] for r in rows])).long()
    y_all = torch.from_numpy(np.stack([r["targets"] for r in rows])).long()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 else nullcontext
    t0, tokens = None, 0
    for step in range(steps + warmup):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
        i = (step * batch) % (len(rows) - batch)
        x, y = x_all[i:i + batch].to(device), y_all[i:i + batch].to(device)
        with autocast():
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        tokens += x.numel()
    return tokens / (time.perf_counter() - t0)


def ray_path(tokenizer, rows, args, zero_stage: int, dtype: str) -> dict:
    import ray.data

    from nanochat.train.metrics import read_jsonl
    from nanochat.train.trainer import train_stage

    s = "pretrain"
    overrides = [
        f"model.depth={args.depth}", "model.aspect_ratio=64", "model.head_dim=64", f"model.sequence_len={args.seq}",
        f"{s}.device_batch_size={args.batch}", f"{s}.total_batch_size={args.batch * args.seq}",
        f"{s}.num_iterations={args.steps + 10}", f"{s}.eval_every=-1", f"{s}.eval_tokens={args.seq * args.batch}",
        f"{s}.sample_every=-1", f"{s}.save_every=-1", f"{s}.report_every=10", f"{s}.optimizer=adamw",
        f"{s}.zero_stage={zero_stage}", f"{s}.dtype={dtype}", f"{s}.warmdown_ratio=0",
    ]
    ds = {"train": ray.data.from_items(rows), "val": ray.data.from_items(rows[: args.batch])}
    r = train_stage(s, "tiny", overrides=overrides, num_workers=1, datasets=ds, tag=f"bench-z{zero_stage}",
                    export=False, restart=True)
    windows = [x for x in read_jsonl(r.metrics_path) if x["step"] > 10 and x["step"] % 10 == 0]
    return {
        "tok_per_sec": statistics.median(x["train/tok_per_sec"] for x in windows),
        "data_wait_frac": statistics.mean(x["train/data_wait_frac"] for x in windows),
        "mfu": statistics.median(x["train/mfu"] for x in windows),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("NANOCHAT_BASE_DIR", tempfile.mkdtemp(prefix="bench-train-"))
    os.environ.setdefault("NANOCHAT_LOG_LEVEL", "WARNING")
    import torch

    from nanochat.common import resolved_dtype
    from nanochat.model import config_for_depth
    from nanochat.ray_utils import init_ray
    from nanochat.tokenizer import Tokenizer
    from nanochat.train.trainer import resolve_dtype

    cuda = torch.cuda.is_available()
    tokenizer = Tokenizer.train_from_iterator([TEXT], vocab_size=256 + 9 + 40)
    tokenizer.save(Path(os.environ["NANOCHAT_BASE_DIR"]) / "tokenizer")
    config = config_for_depth(args.depth, tokenizer.vocab_size, sequence_len=args.seq, aspect_ratio=64, head_dim=64)
    rows = make_rows(tokenizer.vocab_size, args.seq, args.batch * (args.steps + 14))
    dtype = resolved_dtype(resolve_dtype("auto", cuda), "cuda" if cuda else "cpu")
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    init_ray()

    before = plain_loop(config, rows, args.batch, args.steps, dtype)
    ray0 = ray_path(tokenizer, rows, args, 0, dtype_name)
    ray2 = ray_path(tokenizer, rows, args, 2, dtype_name)
    after = plain_loop(config, rows, args.batch, args.steps, dtype)
    plain = (before + after) / 2
    out = {
        "bench": "train", "device": "cuda" if cuda else "cpu", "dtype": dtype_name,
        "model": {"depth": args.depth, "n_embd": config.n_embd, "seq": args.seq, "batch": args.batch},
        "plain_tok_per_sec": round(plain, 1), "plain_spread": round(abs(before - after) / plain, 3),
        "ray_zero0_tok_per_sec": round(ray0["tok_per_sec"], 1), "ray_zero2_tok_per_sec": round(ray2["tok_per_sec"], 1),
        "ratio_zero0_vs_plain": round(ray0["tok_per_sec"] / plain, 3),
        "ratio_zero2_vs_plain": round(ray2["tok_per_sec"] / plain, 3),
        "data_wait_frac_zero0": round(ray0["data_wait_frac"], 4), "data_wait_frac_zero2": round(ray2["data_wait_frac"], 4),
        "mfu_zero0": round(ray0["mfu"], 4), "mfu_zero2": round(ray2["mfu"], 4),
    }
    if not cuda:
        bf16 = plain_loop(config, rows, args.batch, args.steps, torch.bfloat16)
        fp32 = plain_loop(config, rows, args.batch, args.steps, torch.float32)
        out["cpu_bf16_vs_fp32_plain"] = round(bf16 / fp32, 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
