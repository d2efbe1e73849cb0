"""Training throughput and memory: compiled vs eager, bf16 vs fp32, Ray Train + DeepSpeed vs a plain loop.

1 worker, at the ``tiny`` preset's model shape by default (depth 4, 256 wide, 256 context, vocab 4096;
batch 8). Every configuration of the single section runs in a process of its own (``--one``), so
runs cannot disturb each other: each Ray run starts a fresh local Ray and shuts it down, each plain
loop runs without Ray, and no compile-worker pool or idle actor of one run outlives it. The
configurations run ``--repeats`` times in rounds, each round in a rotated order (A/B interleaved, so
drift on a shared host falls on every configuration alike); the figures are the medians, each run's
figure and the 1-minute load average at its start and end are in the JSON. Plain loops run at the
niceness Ray gives its workers (15), so other processes on the host slow both alike.

* ``compiled_vs_eager``: our default recipe (Muon + AdamW, ZeRO 0) through the Ray path with
  ``compile: false`` and ``compile: true``, with the smoothed loss after the run of each (same rows in
  the same order, so the two losses should agree within noise).
* ``ratio_muon_compiled_vs_plain``: that compiled run against a plain loop with the same optimizer
  (:class:`MuonAdamW`, momentum schedule, clipping, Newton-Schulz compiled with the model).
  ``cpu_cores_ray_worker`` / ``cpu_cores_plain``: the CPU cores each kept busy (process CPU seconds per
  wall second, median window); ``ratio_tok_per_cpu_s_vs_plain``: the Ray worker's tokens per CPU second
  over the plain loop's. The two split the Ray-vs-plain ratio: the CPU the rest of Ray took from the
  worker (daemons, Train controller, data actors), and what the worker does per token beyond the loop.
* ``ratio_zero{0,2}_vs_plain``: the Ray path (AdamW, ZeRO 0 and 2, compiled) against a plain loop on
  the same model, rows, batch, optimizer (torch's AdamW) and compile setting.
* ``cpu_bf16_vs_fp32_plain`` (CPU only): the compiled plain AdamW loop in bf16 autocast vs fp32.
* ``peak_rss_mb``: the Ray training worker's peak RSS (its ``worker/peak_rss_mb`` metric) eager and
  compiled, at the tiny shape and, with ``--d12-steps N`` (default 2; 0 skips), at the d12 model
  shape (depth 12, 768 wide, vocab 65536, one 2048-token row per step) for N steps (one run each).

* ``scale`` (``--sections scale``, or ``all``): 2 workers, ZeRO 2, on a two-node Ray cluster simulated on
  this host (tests/_cluster.py, the multi-node tests' cluster: a head and a worker node started with
  ``ray start``, 3 + 3 logical CPUs, their own ports and temp dirs; gloo over TCP):
  ``muon_vs_adamw_zero2`` (tok/s and the loss after the run, both workers on one node) and
  ``two_nodes_vs_one_node`` (the Muon run with ``placement_strategy`` STRICT_SPREAD, one worker per node,
  over the same run with STRICT_PACK: the cost of crossing nodes; on one host only the node boundary
  differs, not the network).

Throughput, Ray and plain alike, is the median of the 10-step windows after step 10 (compilation,
reporting and eval time excluded, data waits included). The dtype is what ``dtype: auto`` picks on
this machine. Tokenizers are trained on generated Zipf-distributed text so the vocab sizes are the
real ones. Prints ONE JSON line.

    python benchmarks/bench_train.py [--steps 60] [--depth 4] [--seq 256] [--batch 8] [--d12-steps 2]
                                     [--repeats 2] [--sections all|single|scale]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


def plain_loop(model_config, rows, batch: int, steps: int, dtype, compiled: bool, optimizer: str = "adamw",
               lr: float = 3e-3, window: int = 10) -> dict:
    """A bare loop: model, optimizer, grad clip 1.0, the same rows, ``steps`` steps, no Ray, no DeepSpeed.

    ``optimizer``: ``adamw`` (torch's, ``lr``) or ``muon_adamw`` (our recipe: the ``tiny`` preset's
    learning rates, Muon's momentum warm-up, Newton-Schulz compiled with the model). Returns
    ``tok_per_sec`` (median of the ``window``-step windows after the first, as the Ray figure) and
    ``loss`` (the smoothed loss after the last step, as ``train/loss``) and ``cpu_cores`` (this process's CPU
    seconds per wall second, median of the same windows, as ``worker/cpu_cores``)."""
    import numpy as np
    import torch

    from nanochat.model import build_model
    from nanochat.train.compile import COMPILE_KWARGS
    from nanochat.train.metrics import EMA
    from nanochat.train.optim import set_lr
    from nanochat.train.schedule import muon_momentum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(model_config, device=device)
    if compiled:
        if device.type == "cpu":
            import torch._inductor.config

            torch._inductor.config.compile_threads = 1  # as in the Ray worker (nanochat.train.compile)
        model.compile(**COMPILE_KWARGS)
    if optimizer == "muon_adamw":
        from nanochat.config import load_preset
        from nanochat.train.optim import build_optimizer

        opt, _ = build_optimizer(model, load_preset("tiny").pretrain, dtype)
        opt.compiled = compiled
    else:
        opt = torch.optim.AdamW([{"params": list(model.parameters()), "initial_lr": lr}], lr=lr, betas=(0.9, 0.95),
                                eps=1e-8)
    x_all = torch.from_numpy(np.stack([r["inputs"] for r in rows])).long()
    y_all = torch.from_numpy(np.stack([r["targets"] for r in rows])).long()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 else nullcontext
    ema, rates, cores, t0, c0 = EMA(0.9), [], [], time.perf_counter(), time.process_time()

    def close_window(n: int) -> None:
        nonlocal t0, c0
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        rates.append(n * batch * x_all.size(1) / elapsed)
        cores.append((time.process_time() - c0) / elapsed)
        t0, c0 = time.perf_counter(), time.process_time()

    for step in range(steps):
        if step and step % window == 0:
            close_window(window)
        set_lr(opt, 1.0, muon_momentum(step) if optimizer == "muon_adamw" else None)
        i = (step * batch) % (len(rows) - batch)
        x, y = x_all[i:i + batch].to(device), y_all[i:i + batch].to(device)
        with autocast():
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(loss.item())
    close_window(steps - (steps - 1) // window * window)
    return {"tok_per_sec": statistics.median(rates[1:] or rates), "loss": ema.get(),
            "cpu_cores": statistics.median(cores[1:] or cores)}


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
        "cpu_cores": statistics.median(x["worker/cpu_cores"] for x in windows),
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
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the single section's runs (medians)")
    parser.add_argument("--sections", choices=("all", "single", "scale"), default="all",
                        help="single: the 1-worker figures; scale: the 2-worker/two-node ones")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one measurement (a JSON spec), in this process
    args = parser.parse_args()
    os.environ.setdefault("NANOCHAT_BASE_DIR", tempfile.mkdtemp(prefix="bench-train-"))
    os.environ.setdefault("NANOCHAT_LOG_LEVEL", "WARNING")
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
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
    dtype = resolved_dtype(resolve_dtype("auto", cuda), "cuda" if cuda else "cpu")
    dtype_name = "bfloat16" if dtype == torch.bfloat16 else "float32"
    shape = {"depth": args.depth, "seq": args.seq, "batch": args.batch, "head_dim": args.head_dim, "steps": total}
    header = {"bench": "train", "device": "cuda" if cuda else "cpu", "dtype": dtype_name, "host": _host(),
              "model": {"depth": args.depth, "n_embd": config.n_embd, "head_dim": args.head_dim,
                        "vocab": tokenizer.vocab_size, "seq": args.seq, "batch": args.batch}}
    out = {**header, **(single_sections(args, shape, dtype_name, cuda, base)
                        if args.sections in ("all", "single") else {})}
    if args.sections in ("all", "scale"):  # joins its own two-node cluster
        scale_rows = make_rows(tokenizer.vocab_size, args.seq, 2 * args.batch * (total + 4), seed=1, tokenizer=tokenizer)
        out.update(scale_section(scale_rows, shape, dtype_name, base))
    print(json.dumps(out), flush=True)


RAY_WORKER_NICENESS = 15  # Ray's default for its worker processes (RAY_worker_niceness)


def _host() -> dict:
    """The CPU model, its core count, whether it has AMX / avx512_bf16 (bf16 units) and the 1-minute load."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"cpu": model, "cores": os.cpu_count(), "amx_bf16": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "load_1min_at_start": round(os.getloadavg()[0], 2)}


def run_one(spec: dict) -> dict:
    """One measurement in this process (a child of :func:`measure`): ``spec["kind"]`` ``plain`` (no Ray,
    at the Ray workers' niceness) or ``ray`` (a fresh local Ray, shut down after the run). The rows are
    rebuilt from the tokenizer the parent saved in ``$NANOCHAT_BASE_DIR/tokenizer`` (the same rows in
    every run). Returns the run's figures and ``load_1min`` at its start and end."""
    import torch

    from nanochat.model import config_for_depth
    from nanochat.tokenizer import Tokenizer

    load0 = os.getloadavg()[0]
    base = Path(os.environ["NANOCHAT_BASE_DIR"])
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(base / "cache" / "torch_compile"))  # the Ray workers' cache
    tokenizer = Tokenizer.load(base / "tokenizer")
    rows = make_rows(tokenizer.vocab_size, spec["seq"], spec["n_rows"], seed=1,
                     tokenizer=tokenizer if spec["text"] else None)
    if spec["kind"] == "plain":
        os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0)))
        config = config_for_depth(spec["depth"], tokenizer.vocab_size, sequence_len=spec["seq"], aspect_ratio=64,
                                  head_dim=spec["head_dim"])
        dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
        out = plain_loop(config, rows, spec["batch"], spec["steps"], dtype, compiled=spec["compiled"],
                         optimizer=spec["optimizer"])
    else:
        import ray

        from nanochat.ray_utils import init_ray

        init_ray()
        shape = {k: spec[k] for k in ("depth", "seq", "batch", "head_dim", "steps")}
        out = ray_path(rows, **shape, dtype=spec["dtype"], optimizer=spec["optimizer"], zero_stage=spec["zero_stage"],
                       compiled=spec["compiled"], tag=spec["name"])
        ray.shutdown()
    return {**out, "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def measure(spec: dict, base: Path, timeout_s: float = 1800) -> dict:
    """:func:`run_one` in a fresh Python process with ``NANOCHAT_BASE_DIR=base``; its JSON line.

    Raises:
        RuntimeError: the run failed (the end of its stderr in the message).
    """
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)],
                          env={**os.environ, "NANOCHAT_BASE_DIR": str(base)}, capture_output=True, text=True,
                          timeout=timeout_s)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench run {spec['name']} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _spec(name: str, kind: str, shape: dict, dtype: str, optimizer: str = "muon_adamw", compiled: bool = True,
          zero_stage: int = 0, text: bool = True) -> dict:
    return {"name": name, "kind": kind, **shape, "dtype": dtype, "optimizer": optimizer, "compiled": compiled,
            "zero_stage": zero_stage, "text": text, "n_rows": shape["batch"] * (shape["steps"] + 4)}


def single_sections(args, shape: dict, dtype_name: str, cuda: bool, base: Path) -> dict:
    """The 1-worker figures: compiled vs eager, Ray vs a plain loop, bf16 vs fp32, peak RSS."""
    total = shape["steps"]
    specs = [
        _spec("ray_muon_eager", "ray", shape, dtype_name, compiled=False),
        _spec("ray_muon_compiled", "ray", shape, dtype_name),
        _spec("plain_muon_compiled", "plain", shape, dtype_name),
        _spec("ray_adamw_zero0", "ray", shape, dtype_name, optimizer="adamw"),
        _spec("ray_adamw_zero2", "ray", shape, dtype_name, optimizer="adamw", zero_stage=2),
        _spec("plain_adamw_compiled", "plain", shape, dtype_name, optimizer="adamw"),
    ]
    if not cuda:
        specs.append(_spec("plain_adamw_fp32", "plain", shape, "float32", optimizer="adamw"))
    runs: dict[str, list[dict]] = {s["name"]: [] for s in specs}
    for r in range(args.repeats):  # each round in a rotated order: A/B interleaved
        for spec in specs[r % len(specs):] + specs[:r % len(specs)]:
            runs[spec["name"]].append(measure(spec, base))

    def median_of(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    def tps(name: str) -> float:
        return median_of(name, "tok_per_sec")

    def first(name: str, key: str):
        return runs[name][0][key]

    eager, compiled, plain_muon, plain = (tps(n) for n in ("ray_muon_eager", "ray_muon_compiled",
                                                           "plain_muon_compiled", "plain_adamw_compiled"))
    out = {
        "repeats": args.repeats, "plain_niceness": RAY_WORKER_NICENESS,
        "runs": {name: {"tok_per_sec": [round(r["tok_per_sec"], 1) for r in rs],
                        "loss": [round(r["loss"], 4) for r in rs], "load_1min": [r["load_1min"] for r in rs]}
                 for name, rs in runs.items()},
        "eager_tok_per_sec": round(eager, 1), "compiled_tok_per_sec": round(compiled, 1),
        "compiled_vs_eager": round(compiled / eager, 3),
        f"loss_after_{total}_eager": round(first("ray_muon_eager", "loss"), 4),
        f"loss_after_{total}_compiled": round(first("ray_muon_compiled", "loss"), 4),
        "plain_muon_tok_per_sec": round(plain_muon, 1),
        "ratio_muon_compiled_vs_plain": round(compiled / plain_muon, 3),
        "cpu_cores_ray_worker": round(median_of("ray_muon_compiled", "cpu_cores"), 3),
        "cpu_cores_plain": round(median_of("plain_muon_compiled", "cpu_cores"), 3),
        "ratio_tok_per_cpu_s_vs_plain": round(
            (compiled / median_of("ray_muon_compiled", "cpu_cores"))
            / (plain_muon / median_of("plain_muon_compiled", "cpu_cores")), 3),
        "plain_tok_per_sec": round(plain, 1),
        "ray_zero0_tok_per_sec": round(tps("ray_adamw_zero0"), 1), "ray_zero2_tok_per_sec": round(tps("ray_adamw_zero2"), 1),
        "ratio_zero0_vs_plain": round(tps("ray_adamw_zero0") / plain, 3),
        "ratio_zero2_vs_plain": round(tps("ray_adamw_zero2") / plain, 3),
        "data_wait_frac_compiled": round(median_of("ray_muon_compiled", "data_wait_frac"), 4),
        "mfu_compiled": round(median_of("ray_muon_compiled", "mfu"), 4),
        "compile_worked": all(bool(r["compiled"]) for r in runs["ray_muon_compiled"]),
        "peak_rss_mb": {"tiny_eager": first("ray_muon_eager", "peak_rss_mb"),
                        "tiny_compiled": first("ray_muon_compiled", "peak_rss_mb")},
    }
    if not cuda:
        out["cpu_bf16_vs_fp32_plain"] = round(plain / tps("plain_adamw_fp32"), 3)
    if args.d12_steps > 0:
        d12_base = base / "d12"  # its own tokenizer (vocab 65536) and compile cache
        _tokenizer(65536, d12_base)
        d12 = {"depth": 12, "seq": 2048, "batch": 1, "head_dim": 128, "steps": args.d12_steps}
        for compiled in (False, True):
            name = f"d12_{'compiled' if compiled else 'eager'}"
            spec = {**_spec(name, "ray", d12, dtype_name, compiled=compiled, text=False), "n_rows": args.d12_steps + 2}
            out["peak_rss_mb"][name] = measure(spec, d12_base)["peak_rss_mb"]
    rss = out["peak_rss_mb"]
    out["peak_rss_compiled_vs_eager"] = {k: round(rss[f"{k}_compiled"] / rss[f"{k}_eager"], 3)
                                         for k in ("tiny", "d12") if f"{k}_eager" in rss}
    return out


if __name__ == "__main__":
    main()
