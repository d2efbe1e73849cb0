"""Eval fan-out throughput: examples/s with 1 vs 2 Ray actors on the same CORE slice (one JSON line).

    .venv/bin/python benchmarks/bench_eval.py [--examples 32]

Builds a small random checkpoint and a synthetic multiple-choice task in a temp base dir, warms
both actor pools up once (model load excluded), then times each. Prints
``{"bench": "eval_fanout", "examples", "eps_1_actor", "eps_2_actors", "speedup"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("NANOCHAT_BASE_DIR", tempfile.mkdtemp(prefix="bench-eval-"))
    import torch

    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.eval.core import CoreTask
    from nanochat.eval.fanout import ActorPool, run_fanout
    from nanochat.model import GPTConfig, build_model
    from nanochat.ray_utils import init_ray
    from nanochat.tokenizer import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_TEXTS

    tok = Tokenizer.train_from_iterator(TINY_TEXTS * 4, vocab_size=256 + 9 + 119)
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=4, n_embd=256)
    ckpt = save_checkpoint(checkpoint_dir("base", "bench", 0), build_model(cfg), cfg, tok, stage="base", step=0)
    task = CoreTask("bench_mc", "multiple_choice", 3, 25.0, "x.jsonl")
    data = [{"query": f"{TINY_TEXTS[i % 6][:120]} ({i}) so", "choices": [" yes.", " no.", " maybe.", " later."],
             "gold": i % 4} for i in range(args.examples)]
    payload = {"task": task.to_dict(), "data": data}
    init_ray()
    rates = {}
    for n in (1, 2):
        idx = list(range(args.examples))
        pool = ActorPool(ckpt, n)  # models load here, outside the timing
        run_fanout(ckpt, "nanochat.eval.core:evaluate_shard", payload, idx[: 2 * n], pool=pool)  # warm-up
        start = time.perf_counter()
        run_fanout(ckpt, "nanochat.eval.core:evaluate_shard", payload, idx, pool=pool)
        rates[n] = args.examples / (time.perf_counter() - start)
        pool.close()
    print(json.dumps({"bench": "eval_fanout", "examples": args.examples, "eps_1_actor": round(rates[1], 3),
                      "eps_2_actors": round(rates[2], 3), "speedup": round(rates[2] / rates[1], 3)}))


if __name__ == "__main__":
    main()
