"""Decode throughput: KV-cache decoding vs re-running the whole sequence every step.

Same randomly initialized model (depth 4 by default), same prompts, same run. Batch 1 and 8.
Also times the full :class:`~nanochat.engine.Engine` (sampling, streaming text, tool state) and
KV-cache decode in bf16 vs fp32 (report only; defaults elsewhere are unchanged). Prints ONE JSON
line; ratios > 1 mean the first thing is faster.

    python benchmarks/bench_decode.py [--depth 4] [--prompt-len 48] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from nanochat.engine import Engine, SamplingParams
from nanochat.model import GPT, build_model, config_for_depth
from nanochat.tokenizer import Tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b\n" * 20,
    "Numbers 12345 67890 3.14159 and dates 2024-11-28 appear here. " * 20,
]


def make_model(depth: int, vocab_size: int, seq_len: int) -> GPT:
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, vocab_size, sequence_len=seq_len, head_dim=64))
    with torch.no_grad():  # the reference init zeroes these; random values give realistic logits
        model.lm_head.weight.normal_(0, 0.02)
    return model.eval()


@torch.inference_mode()
def kv_decode(model: GPT, prompts: torch.Tensor, new_tokens: int) -> float:
    """Tokens/s of greedy decoding with a KV cache (prefill excluded from the timed part)."""
    batch, plen = prompts.shape
    cache = model.new_kv_cache(batch, plen + new_tokens)
    next_ids = model(prompts, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        next_ids = model(next_ids, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
    return batch * (new_tokens - 1) / (time.perf_counter() - start)


@torch.inference_mode()
def recompute_decode(model: GPT, prompts: torch.Tensor, new_tokens: int) -> float:
    """Tokens/s of greedy decoding that runs the full sequence through the model every step."""
    seq = prompts
    seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return prompts.shape[0] * (new_tokens - 1) / (time.perf_counter() - start)


def engine_decode(model: GPT, tokenizer: Tokenizer, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s through the Engine (prefill included; rows may stop early on assistant_end)."""
    engine = Engine(model, tokenizer, max_batch_size=len(prompts), prefix_cache=False)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    start = time.perf_counter()
    engine.generate_many(prompts, params)
    return engine.tokens_generated / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()

    tokenizer = Tokenizer.train_from_iterator(TEXTS * 4, vocab_size=256 + 9 + 64)
    model = make_model(args.depth, tokenizer.vocab_size, args.prompt_len + args.new_tokens)
    gen = torch.Generator().manual_seed(0)
    result: dict = {
        "bench": "decode",
        "depth": args.depth,
        "n_embd": model.config.n_embd,
        "params_M": round(model.num_params() / 1e6, 2),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    model_bf16 = make_model(args.depth, tokenizer.vocab_size, args.prompt_len + args.new_tokens).to(
        torch.bfloat16
    )
    for batch in (1, 8):
        prompts = torch.randint(0, tokenizer.vocab_size - 9, (batch, args.prompt_len), generator=gen)
        kv_decode(model, prompts, 4)  # warm-up
        kv = kv_decode(model, prompts, args.new_tokens)
        full = recompute_decode(model, prompts, args.new_tokens)
        eng = engine_decode(model, tokenizer, prompts.tolist(), args.new_tokens)
        kv_decode(model_bf16, prompts, 4)
        bf16 = kv_decode(model_bf16, prompts, args.new_tokens)
        result |= {
            f"kv_tok_s_b{batch}": round(kv, 1),
            f"recompute_tok_s_b{batch}": round(full, 1),
            f"engine_tok_s_b{batch}": round(eng, 1),
            f"kv_bf16_tok_s_b{batch}": round(bf16, 1),
            f"kv_speedup_b{batch}": round(kv / full, 2),
            f"engine_vs_recompute_b{batch}": round(eng / full, 2),
            f"bf16_vs_fp32_b{batch}": round(bf16 / kv, 2),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
