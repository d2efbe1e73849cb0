"""RL stage throughput: rollout tokens/s with 1 vs 2 rollout actors, learner idle fraction (one JSON line).

    .venv/bin/python benchmarks/bench_rl.py [--steps 4] [--width 256]

Builds a random 4-layer checkpoint (stage ``sft``) in a temp base dir and runs the real RL stage
(:func:`nanochat.rl.run.train_rl`: a one-worker Ray Train + DeepSpeed learner and rollout actors on a
local Ray) for ``--steps``
steps on the arithmetic task, once with 1 rollout actor and once with 2, both with evaluation off.
From each run's metrics.jsonl (first step excluded: warm-up) it reports the mean
``rollout_tokens_per_s`` (completion tokens / rollout wall time of the step) and
``learner_idle_frac`` (time the learner waited for rollouts / (wait + its step)). Prints
``{"bench": "rl", "steps", "tok_s_1_actor", "tok_s_2_actors", "speedup", "idle_1_actor", "idle_2_actors"}``.
Measure on a quiet machine (two actors need two free cores to help).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    os.environ.setdefault("NANOCHAT_BASE_DIR", str(base))
    import torch

    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.config import load_preset
    from nanochat.model import GPTConfig, build_model
    from nanochat.ray_utils import init_ray
    from nanochat.rl.run import train_rl
    from nanochat.tokenizer import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import TINY_TEXTS

    tok = Tokenizer.train_from_iterator(TINY_TEXTS * 4, vocab_size=256 + 9 + 119)
    torch.manual_seed(0)
    cfg = GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=4, n_embd=args.width)
    save_checkpoint(checkpoint_dir("sft", "bench", 0, base), build_model(cfg), cfg, tok, "sft", 0)
    init_ray(num_cpus=4, base=base)
    out: dict[str, float | int | str] = {"bench": "rl", "steps": args.steps}
    for actors in (1, 2):
        preset = load_preset("tiny", [
            "rl.task=arithmetic", "rl.num_samples=8", "rl.questions_per_step=16", "rl.max_new_tokens=32",
            f"rl.num_iterations={args.steps}", "rl.eval_every=-1", "rl.eval_questions=1", "rl.pass_k=1",
            "rl.save_every=-1", f"rl.num_rollout_actors={actors}"])
        train_rl(preset, tag=f"bench{actors}", from_checkpoint=str(checkpoint_dir("sft", "bench", 0, base)),
                 restart=True, base=base)
        lines = (base / "checkpoints" / "rl" / f"bench{actors}" / "metrics.jsonl").read_text().splitlines()
        steps = [r for r in map(json.loads, lines) if "rollout_tokens_per_s" in r][1:] or [{}]
        key = "1_actor" if actors == 1 else "2_actors"
        out[f"tok_s_{key}"] = round(sum(r.get("rollout_tokens_per_s", 0.0) for r in steps) / len(steps), 1)
        out[f"idle_{key}"] = round(sum(r.get("learner_idle_frac", 0.0) for r in steps) / len(steps), 3)
    out["speedup"] = round(float(out["tok_s_2_actors"]) / max(float(out["tok_s_1_actor"]), 1e-9), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
