"""Training throughput and memory: compiled vs eager, bf16 vs fp32, Ray Train + DeepSpeed vs a plain loop.

Everything is measured in the same run, 1 worker, at the ``tiny`` preset's model shape by default
(depth 4, 256 wide, 256 context, vocab 4096; batch 8):

* ``compiled_vs_eager``: our default recipe (Muon + AdamW, ZeRO 0) through the Ray path with
  ``compile: false`` and ``compile: true``, with the smoothed loss after ``--steps`` steps of each
  (same rows in the same order, so the two losses should agree within noise).
* ``ratio_muon_compiled_vs_plain``: the compiled Muon run against a plain loop with the same optimizer
  (:class:`MuonAdamW`, Newton-Schulz compiled), measured before and after it.
* ``ratio_zero{0,2}_vs_plain``: the Ray path (AdamW, ZeRO 0 and 2, compiled) against a plain
  single-process loop on the same model, rows, batch, optimizer and compile setting; the plain loop
  runs before and after the Ray runs and their mean is the baseline (cancels drift on a shared host).
* ``cpu_bf16_vs_fp32_plain`` (CPU only): the compiled plain loop in bf16 autocast vs fp32.
* ``peak_rss_mb``: the Ray training worker's peak RSS (its ``worker/peak_rss_mb`` metric) eager and
  compiled, at the tiny shape and, with ``--d12-steps N`` (default 2; 0 skips), at the d12 model
  shape (depth 12, 768 wide, vocab 65536, one 2048-token row per step) for N steps.

* ``scale`` (``--sections scale``, or ``all``): 2 workers, ZeRO 2, on a two-node Ray cluster simulated on
  this host (tests/_cluster.py, the multi-node tests' cluster: a head and a worker node started with
  ``ray start``, 3 + 3 logical CPUs, their own ports and temp dirs; gloo over TCP):
  ``muon_vs_adamw_zero2`` (tok/s and the loss after the run, both workers on one node) and
  ``two_nodes_vs_one_node`` (the Muon run with ``placement_strategy`` STRICT_SPREAD, one worker per node,
  over the same run with STRICT_PACK: the cost of crossing nodes; on one host only the node boundary
  differs, not the network).

Ray throughput is the median of the reported windows after step 10 (compilation, reporting and
eval time excluded, data waits included). The dtype is what ``dtype: auto`` picks on this machine.
Tokenizers are trained on generated Zipf-distributed text so the vocab sizes are the real ones.
Prints ONE JSON line.

    python benchmarks/bench_train.py [--steps 60] [--depth 4] [--seq 256] [--batch 8] [--d12-steps 2]
                                     [--sections all|single|scale]
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


def synthetic_text(num_words: int, lexicon: int, seed: int = 0) -> list[str]:
    """Zipf-distributed random words in 10 kB documents: enough distinct pairs for a large BPE vocab."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 10, size=lexicon)
    chars = rng.integers(0, 26, size=int(lengths.sum())).astype(np.uint8) + ord("a")
    words = np.split(chars, np.cumsum(lengths)[:-1])
    lex = [w.tobytes().decode() for w in words]
    p = 1.0 / np.arange(1, lexicon + 1) ** 0.8
    text = " ".join(lex[i] for i in rng.choice(lexicon, size=num_words, p=p / p.sum()))
    return [text[i:i + 10_000] for i in range(0, len(text), 10_000)]


def make_rows(vocab: int, seq: int, n: int, seed: int = 0, tokenizer=None):
    """``n`` rows of ``seq`` tokens: the tokenized generated text (so the loss falls), else random ids."""
    import numpy as np

    if tokenizer is not None:
        bos = tokenizer.get_bos_token_id()
        stream = [t for doc in synthetic_text(n * seq // 2, 30_000, seed) for t in [bos, *tokenizer.encode(doc)]]
        ids = np.resize(np.array(stream, dtype=np.int64), (n, seq + 1))  # repeats the text if it is short
    else:
        ids = np.random.default_rng(seed).integers(0, vocab - 9, size=(n, seq + 1))
    return [{"inputs": r[:-1].astype(np.int32), "targets": r[1:].astype(np.int64)} for r in ids]


def plain_loop(model_config, rows, batch: int, steps: int, dtype, compiled: bool, lr: float = 3e-3,
               warmup: int = 3, optimizer: str = "adamw") -> float:
    """Tokens/s of a bare loop: model, optimizer, grad clip, the same rows; timed after ``warmup`` steps.

    ``optimizer``: ``adamw`` (torch's) or ``muon_adamw`` (our recipe, the ``tiny`` preset's learning
    rates, Newton-Schulz compiled with the model)."""
    import numpy as np
    import torch

    from nanochat.model import build_model
    from nanochat.train.compile import COMPILE_KWARGS

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(model_config, device=device)
    if compiled:
        model.compile(**COMPILE_KWARGS)
    if optimizer == "muon_adamw":
        from nanochat.config import load_preset
        from nanochat.train.optim import build_optimizer

        opt, _ = build_optimizer(model, load_preset("tiny").pretrain, dtype)
        opt.compiled = compiled
    else:
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


def ray_path(rows, *, depth: int, seq: int, batch: int, head_dim: int, steps: int, dtype: str, zero_stage: int = 0,
             optimizer: str = "muon_adamw", compiled: bool, tag: str, workers: int = 1,
             placement: str = "PACK") -> dict:
    """One Ray Train + DeepSpeed pretraining run (``workers`` workers, each ``batch`` rows per step);
    throughput (all workers) of the windows after step 10."""
    import ray.data

    from nanochat.train.metrics import read_jsonl
    from nanochat.train.trainer import train_stage

    s = "pretrain"
    overrides = [
        f"model.depth={depth}", "model.aspect_ratio=64", f"model.head_dim={head_dim}", f"model.sequence_len={seq}",
        f"{s}.device_batch_size={batch}", f"{s}.total_batch_size={batch * seq * workers}", f"{s}.num_iterations={steps}",
        f"{s}.eval_every=-1", f"{s}.eval_tokens={seq * batch}", f"{s}.sample_every=-1", f"{s}.save_every=-1",
        f"{s}.report_every={10 if steps > 10 else 1}", f"{s}.optimizer={optimizer}", f"{s}.zero_stage={zero_stage}",
        f"{s}.dtype={dtype}", f"{s}.warmdown_ratio=0", f"{s}.compile={str(compiled).lower()}",
        f"ray.placement_strategy={placement}",
    ]
    ds = {"train": ray.data.from_items(rows), "val": ray.data.from_items(rows[:batch])}
    r = train_stage(s, "tiny", overrides=overrides, num_workers=workers, datasets=ds, tag=tag, export=False,
                    restart=True)
    records = [x for x in read_jsonl(r.metrics_path) if "train/tok_per_sec" in x]
    windows = [x for x in records if x["step"] > 10] or records
    return {
        "tok_per_sec": statistics.median(x["train/tok_per_sec"] for x in windows),
        "data_wait_frac": statistics.mean(x["train/data_wait_frac"] for x in windows),
        "mfu": statistics.median(x["train/mfu"] for x in windows),
        "loss": records[-1]["train/loss"], "peak_rss_mb": max(x["worker/peak_rss_mb"] for x in records),
        "compiled": records[-1]["compile"],
    }


def scale_section(rows, shape: dict, dtype: str, base: Path) -> dict:
    """Muon vs AdamW at ZeRO 2 and one node vs two, 2 workers each, on a two-node cluster on this host.

    This process joins the cluster as a driver (``RAY_ADDRESS``), as a user's script on a cluster would."""
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _cluster import start_cluster

    from nanochat.ray_utils import init_ray

    ray.shutdown()
    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="bench-cluster-")), base)
    os.environ["RAY_ADDRESS"] = cluster.gcs
    try:
        init_ray(base=base)
        common = {**shape, "dtype": dtype, "zero_stage": 2, "compiled": False, "workers": 2}
        muon = ray_path(rows, **common, tag="bench-scale-muon", placement="STRICT_PACK")
        adamw = ray_path(rows, **common, optimizer="adamw", tag="bench-scale-adamw", placement="STRICT_PACK")
        spread = ray_path(rows, **common, tag="bench-scale-spread", placement="STRICT_SPREAD")
    finally:
        ray.shutdown()
        del os.environ["RAY_ADDRESS"]
        cluster.stop()
    steps = shape["steps"]
    return {
        "scale": {"workers": 2, "zero_stage": 2, "compile": False, "tokens_per_step": 2 * shape["batch"] * shape["seq"]},
        "muon_vs_adamw_zero2": {
            "muon_tok_per_sec": round(muon["tok_per_sec"], 1), "adamw_tok_per_sec": round(adamw["tok_per_sec"], 1),
            "ratio": round(muon["tok_per_sec"] / adamw["tok_per_sec"], 3),
            f"muon_loss_after_{steps}": round(muon["loss"], 4), f"adamw_loss_after_{steps}": round(adamw["loss"], 4),
        },
        "two_nodes_vs_one_node": {
            "one_node_tok_per_sec": round(muon["tok_per_sec"], 1), "two_nodes_tok_per_sec": round(spread["tok_per_sec"], 1),
            "ratio": round(spread["tok_per_sec"] / muon["tok_per_sec"], 3),
            f"two_nodes_loss_after_{steps}": round(spread["loss"], 4),
        },
    }


def _tokenizer(vocab: int, base: Path):
    from nanochat.tokenizer import Tokenizer

    words = 300_000 if vocab <= 8192 else 2_500_000
    tokenizer = Tokenizer.train_from_iterator(synthetic_text(words, 30_000 if vocab <= 8192 else 80_000), vocab)
    tokenizer.save(base / "tokenizer")
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64, help="tiny preset: 64 (nanochat's d4: 128)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--d12-steps", type=int, default=2, help="steps of the d12-shape memory runs (0: skip)")
    parser.add_argument("--sections", choices=("all", "single", "scale"), default="all",
                        help="single: the 1-worker figures; scale: the 2-worker/two-node ones")
    args = parser.parse_args()
    os.environ.setdefault("NANOCHAT_BASE_DIR", tempfile.mkdtemp(prefix="bench-train-"))
    os.environ.setdefault("NANOCHAT_LOG_LEVEL", "WARNING")
    import torch

    from nanochat.common import resolved_dtype
    from nanochat.model import config_for_depth
    from nanochat.train.trainer import resolve_dtype

    base = Path(os.environ["NANOCHAT_BASE_DIR"])
    cuda = torch.cuda.is_available()
    tokenizer = _tokenizer(args.vocab, base)
    config = config_for_depth(args.depth, tokenizer.vocab_size, sequence_len=args.seq, aspect_ratio=64,
                              head_dim=args.head_dim)
    total = args.steps + 10
    rows = make_rows(tokenizer.vocab_size, args.seq, args.batch * (total + 4), seed=1, tokenizer=tokenizer)
    dtype = resolved_dtype(resolve_dtype("auto", cuda), "cuda" if cuda else "cpu")
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    shape = {"depth": args.depth, "seq": args.seq, "batch": args.batch, "head_dim": args.head_dim, "steps": total}
    header = {"bench": "train", "device": "cuda" if cuda else "cpu", "dtype": dtype_name,
              "model": {"depth": args.depth, "n_embd": config.n_embd, "head_dim": args.head_dim,
                        "vocab": tokenizer.vocab_size, "seq": args.seq, "batch": args.batch}}
    out = {**header, **(single_sections(args, config, rows, shape, dtype, dtype_name, cuda, base)
                        if args.sections in ("all", "single") else {})}
    if args.sections in ("all", "scale"):  # joins its own two-node cluster (the local Ray is shut down)
        tokenizer.save(base / "tokenizer")  # the d12 runs replaced it
        scale_rows = make_rows(tokenizer.vocab_size, args.seq, 2 * args.batch * (total + 4), seed=1, tokenizer=tokenizer)
        out.update(scale_section(scale_rows, shape, dtype_name, base))
    print(json.dumps(out), flush=True)


def single_sections(args, config, rows, shape: dict, dtype, dtype_name: str, cuda: bool, base: Path) -> dict:
    """The 1-worker figures: compiled vs eager, Ray vs a plain loop, bf16 vs fp32, peak RSS."""
    import torch

    from nanochat.ray_utils import init_ray

    total = shape["steps"]
    init_ray()

    muon_eager = ray_path(rows, **shape, dtype=dtype_name, compiled=False, tag="bench-eager")
    muon_plain_before = plain_loop(config, rows, args.batch, args.steps, dtype, compiled=True, optimizer="muon_adamw")
    muon_compiled = ray_path(rows, **shape, dtype=dtype_name, compiled=True, tag="bench-compiled")
    muon_plain = (muon_plain_before + plain_loop(config, rows, args.batch, args.steps, dtype, compiled=True,
                                                 optimizer="muon_adamw")) / 2
    before = plain_loop(config, rows, args.batch, args.steps, dtype, compiled=True)
    ray0 = ray_path(rows, **shape, dtype=dtype_name, optimizer="adamw", compiled=True, tag="bench-z0")
    ray2 = ray_path(rows, **shape, dtype=dtype_name, optimizer="adamw", zero_stage=2, compiled=True, tag="bench-z2")
    after = plain_loop(config, rows, args.batch, args.steps, dtype, compiled=True)
    plain = (before + after) / 2
    out = {
        "eager_tok_per_sec": round(muon_eager["tok_per_sec"], 1),
        "compiled_tok_per_sec": round(muon_compiled["tok_per_sec"], 1),
        "compiled_vs_eager": round(muon_compiled["tok_per_sec"] / muon_eager["tok_per_sec"], 3),
        f"loss_after_{total}_eager": round(muon_eager["loss"], 4),
        f"loss_after_{total}_compiled": round(muon_compiled["loss"], 4),
        "plain_muon_tok_per_sec": round(muon_plain, 1),
        "ratio_muon_compiled_vs_plain": round(muon_compiled["tok_per_sec"] / muon_plain, 3),
        "plain_tok_per_sec": round(plain, 1), "plain_spread": round(abs(before - after) / plain, 3),
        "ray_zero0_tok_per_sec": round(ray0["tok_per_sec"], 1), "ray_zero2_tok_per_sec": round(ray2["tok_per_sec"], 1),
        "ratio_zero0_vs_plain": round(ray0["tok_per_sec"] / plain, 3),
        "ratio_zero2_vs_plain": round(ray2["tok_per_sec"] / plain, 3),
        "data_wait_frac_compiled": round(muon_compiled["data_wait_frac"], 4),
        "mfu_compiled": round(muon_compiled["mfu"], 4), "compile_worked": bool(muon_compiled["compiled"]),
        "peak_rss_mb": {"tiny_eager": muon_eager["peak_rss_mb"], "tiny_compiled": muon_compiled["peak_rss_mb"]},
    }
    if not cuda:
        n = max(10, args.steps // 2)
        bf16 = plain_loop(config, rows, args.batch, n, torch.bfloat16, compiled=True)
        fp32 = plain_loop(config, rows, args.batch, n, torch.float32, compiled=True)
        out["cpu_bf16_vs_fp32_plain"] = round(bf16 / fp32, 3)
    if args.d12_steps > 0:
        d12_tok = _tokenizer(65536, base)  # replaces the tiny runs' tokenizer (they are done)
        d12_rows = make_rows(d12_tok.vocab_size, 2048, args.d12_steps + 2, seed=1)
        d12 = {"depth": 12, "seq": 2048, "batch": 1, "head_dim": 128, "steps": args.d12_steps, "dtype": dtype_name}
        for compiled in (False, True):
            run = ray_path(d12_rows, **d12, compiled=compiled, tag=f"bench-d12-{compiled}")
            out["peak_rss_mb"][f"d12_{'compiled' if compiled else 'eager'}"] = run["peak_rss_mb"]
    rss = out["peak_rss_mb"]
    out["peak_rss_compiled_vs_eager"] = {k: round(rss[f"{k}_compiled"] / rss[f"{k}_eager"], 3)
                                         for k in ("tiny", "d12") if f"{k}_eager" in rss}
    return out


if __name__ == "__main__":
    main()
