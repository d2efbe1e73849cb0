"""Decode speed: our engine vs a bare model forward loop (its floor), compiled vs eager, and
(optionally) nanochat's own engine on the same weights. Prints ONE JSON line; ratios come from
the same run.

Greedy decoding, ``--prompt-len`` random prompt ids, ``--new-tokens`` new tokens per row, at
batch 1 and 16 (``--batches``). Tokens/s count decode steps only (the prefill and the token it
yields are excluded, for every contender alike): ``bare_*`` is a plain loop of model forward +
argmax through a KV cache (``eager``: the model's own cache; ``compiled``: the engine's
fixed-shape step under ``torch.compile``), ``engine_*`` our :class:`~nanochat.engine.Engine`
(sampling, streaming text, stop strings, tool state, slot bookkeeping included), ``engine_auto_*``
one engine as a server builds it with ``serve.compile=auto`` (largest batch, ``warmup()``: on CPU
the batch buckets whose compiled step measures faster run compiled, ``auto_compiled_buckets``).
``same_ids_*`` checks that every contender produced the same ids.

The model is the ``tiny`` shape (depth 4, n_embd 256, vocab 4096, context 256) with random weights
(the rows of the special tokens zeroed so no row stops early), or ``--checkpoint DIR``.
``--nanochat-dir`` (a karpathy/nanochat checkout, commit 10231df) and ``--nanochat-python`` (a
Python with its dependencies) add nanochat's ``Engine.generate`` at batch 1 in a subprocess on the
same weights; nanochat is never imported here. ``--memory`` adds the peak RSS of a serving engine
(batch 16, KV cache allocated, a few decode steps) at the tiny and d12 shapes, each in a fresh
process, eager and (``tiny``) compiled.

    python benchmarks/bench_decode.py [--threads 2] [--nanochat-dir DIR --nanochat-python PY] [--memory]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanochat.engine import Engine, SamplingParams
from nanochat.engine_decode import decode_forward
from nanochat.model import GPT, build_model, config_for_depth
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

SHAPES = {  # name -> (depth, vocab, sequence_len, head_dim)
    "tiny": (4, 4096, 256, 64),
    "d12": (12, 65536, 2048, 128),
}
NANOCHAT_SCRIPT = Path(__file__).with_name("nanochat_engine_run.py")


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer of exactly ``vocab_size`` ids (bytes, printable pairs and triples, specials): every id decodes."""
    ranks = {bytes([i]): i for i in range(256)}
    printable = range(32, 127)
    merged = itertools.chain((bytes(p) for p in itertools.product(printable, repeat=2)),
                             (bytes(p) for p in itertools.product(printable, repeat=3)))
    while len(ranks) < vocab_size - len(SPECIAL_TOKENS):
        ranks[next(merged)] = len(ranks)
    return Tokenizer.from_ranks(SPLIT_PATTERN, ranks)


def random_model(shape: str) -> tuple[GPT, Tokenizer]:
    depth, vocab, seq, head_dim = SHAPES[shape]
    tokenizer = synthetic_tokenizer(vocab)
    torch.manual_seed(0)
    model = build_model(config_for_depth(depth, vocab, sequence_len=seq, head_dim=head_dim))
    with torch.no_grad():  # the reference init zeroes the head; random values give realistic logits
        model.lm_head.weight.normal_(0, 0.02)
        for token in SPECIAL_TOKENS:  # never chosen greedily: every row runs its full length
            model.lm_head.weight[tokenizer.encode_special(token)].zero_()
    return model.eval(), tokenizer


def load_model(checkpoint: str | None) -> tuple[GPT, Tokenizer]:
    if checkpoint is None:
        return random_model("tiny")
    from nanochat.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(checkpoint))
    return ckpt.model.float().eval(), ckpt.tokenizer


def clock_fn(name: str):
    return time.process_time if name == "cpu" else time.perf_counter


@torch.inference_mode()
def bare_eager(model: GPT, prompts: torch.Tensor, new_tokens: int, clock) -> tuple[float, list[list[int]]]:
    batch, plen = prompts.shape
    cache = model.new_kv_cache(batch, plen + new_tokens)
    ids = model(prompts, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
    out = [ids]
    start = clock()
    for _ in range(new_tokens - 1):
        ids = model(ids, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        out.append(ids)
    seconds = clock() - start
    return batch * (new_tokens - 1) / seconds, torch.cat(out, 1).tolist()


@torch.inference_mode()
def bare_compiled(model: GPT, prompts: torch.Tensor, new_tokens: int, clock, step) -> tuple[float, list[list[int]]]:
    batch, plen = prompts.shape
    cache = model.new_kv_cache(batch, model.config.sequence_len)
    ids = model(prompts, kv_cache=cache)[:, -1].argmax(-1)
    pos = torch.full((batch,), plen, dtype=torch.long)
    out = [ids]
    start = clock()
    for _ in range(new_tokens - 1):
        ids = step(model, ids, pos, cache.k, cache.v, cache.max_len, True).argmax(-1)
        pos += 1
        out.append(ids)
    seconds = clock() - start
    return batch * (new_tokens - 1) / seconds, torch.stack(out, 1).tolist()


@torch.inference_mode()
def engine_run(engine: Engine, prompts: list[list[int]], new_tokens: int, clock) -> tuple[float, list[list[int]]]:
    """Decode tok/s after the step that prefilled every prompt (and yielded its first token)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    ids = [engine.add(p, params) for p in prompts]
    got: dict[int, list[int]] = {i: [] for i in ids}
    for event in engine.step():
        got[event.seq_id].append(event.token_id)
    assert engine.num_running == len(prompts), "raise prefill_chunk: every prompt must start in the first step"
    produced, start = 0, clock()
    while engine.has_work():
        for event in engine.step():
            got[event.seq_id].append(event.token_id)
            produced += 1
    seconds = clock() - start
    return produced / seconds, [got[i] for i in ids]


def auto_engine(args, model: GPT, tokenizer: Tokenizer, all_rows: dict[int, list[list[int]]], clock) -> dict:
    """A server's engine as ``serve.compile=auto`` builds it: one engine for the largest batch, ``warmup()``
    (on CPU: compiles and times each batch bucket, keeps the faster ones), then every batch through it."""
    torch._dynamo.reset()  # the graphs built above count against dynamo's per-function recompile limit
    top = max(all_rows)
    engine = Engine(model, tokenizer, max_batch_size=top, prefill_chunk=top * args.prompt_len,
                    prefix_cache=False, compile="auto")
    out: dict = {"auto_warmup_s": round(engine.warmup(), 1),
                 "auto_compiled_buckets": engine.stats()["decode_compiled_buckets"]}
    for batch, rows in all_rows.items():
        eager = Engine(model, tokenizer, max_batch_size=batch, prefill_chunk=batch * args.prompt_len,
                       prefix_cache=False, compile=False)
        _, eager_ids = engine_run(eager, rows, args.new_tokens, clock)
        tok_s, ids = best_of(args.repeat, engine_run, engine, rows, args.new_tokens, clock)
        out |= {f"engine_auto_tok_s_b{batch}": round(tok_s, 1), f"same_ids_auto_b{batch}": ids == eager_ids}
    return out


def best_of(repeat: int, fn, *args) -> tuple[float, list[list[int]]]:
    runs = [fn(*args) for _ in range(repeat)]
    return max(r[0] for r in runs), runs[0][1]


def nanochat_run(args, model: GPT, tokenizer: Tokenizer, prompt: list[int]) -> dict:
    """nanochat's Engine.generate on our weights, batch 1, in its own interpreter."""
    enc = tokenizer.enc
    tok_spec = {"pattern": enc._pat_str, "specials": enc._special_tokens,
                "ranks": [[token.hex(), rank] for token, rank in enc._mergeable_ranks.items()]}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.pt"
        torch.save(to_nanochat_state_dict(model), weights)
        c = model.config
        spec = {"nanochat_dir": str(Path(args.nanochat_dir).resolve()), "weights": str(weights),
                "config": {"sequence_len": c.sequence_len, "vocab_size": c.vocab_size, "n_layer": c.n_layer,
                           "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd},
                "tokenizer": tok_spec, "prompt": prompt, "new_tokens": args.new_tokens, "repeat": args.repeat, "clock": args.clock,
                "threads": torch.get_num_threads()}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        done = subprocess.run([args.nanochat_python, str(NANOCHAT_SCRIPT), str(spec_path)],
                              capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"nanochat run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def to_nanochat_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our parameters under nanochat's state-dict names (they are equal by design; wrappers that
    prefix them, torch.compile's ``_orig_mod.`` or DeepSpeed's ``module.``, are stripped)."""
    out = {}
    for name, tensor in model.state_dict().items():
        for prefix in ("_orig_mod.", "module."):
            name = name.removeprefix(prefix)
        out[name] = tensor.detach().float().contiguous().clone()
    expected = {"transformer.wte.weight", "lm_head.weight"} | {
        f"transformer.h.{i}.{part}.weight" for i in range(model.config.n_layer)
        for part in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    if set(out) != expected:
        raise SystemExit(f"state dict names do not map to nanochat's: {sorted(set(out) ^ expected)[:6]}")
    return out


def rss_child(shape: str, compile_step: bool, steps: int) -> dict:
    """Peak RSS of a serving engine at ``shape``: model, batch-16 KV cache, ``steps`` decode steps."""
    model, tokenizer = random_model(shape)
    model_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    engine = Engine(model, tokenizer, max_batch_size=16, prefix_cache=False, compile=compile_step)
    compile_s = engine.warmup() if compile_step else 0.0
    prompts = torch.randint(0, tokenizer.vocab_size - len(SPECIAL_TOKENS), (16, 32)).tolist()
    with torch.inference_mode():
        engine.generate_many(prompts, SamplingParams(max_tokens=steps, temperature=0.0))
    cache = engine._cache
    return {"shape": shape, "compiled": compile_step, "params_M": round(model.num_params() / 1e6, 1),
            "kv_cache_mb": round((cache.k.numel() + cache.v.numel()) * cache.k.element_size() / 2**20),
            "rss_after_model_mb": round(model_mb), "compile_s": round(compile_s, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def memory_report(threads: int, with_d12_compiled: bool) -> dict:
    out = {}
    runs = [("tiny", False), ("tiny", True), ("d12", False)] + ([("d12", True)] if with_d12_compiled else [])
    for shape, compiled in runs:
        cmd = [sys.executable, __file__, "--rss-child", shape, "--threads", str(threads)]
        done = subprocess.run(cmd + (["--rss-compile"] if compiled else []), capture_output=True, text=True,
                              timeout=7200, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
        if done.returncode != 0:
            raise SystemExit(f"memory child {shape} failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        key = f"{shape}_{'compiled' if compiled else 'eager'}"
        out |= {f"rss_peak_mb_{key}": row["peak_rss_mb"], f"rss_model_mb_{key}": row["rss_after_model_mb"],
                f"kv_cache_mb_{shape}": row["kv_cache_mb"]}
        if compiled:
            out[f"compile_s_{shape}"] = row["compile_s"]
    out["rss_compile_cost_mb_tiny"] = out["rss_peak_mb_tiny_compiled"] - out["rss_peak_mb_tiny_eager"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="our checkpoint dir (default: random tiny-shape model)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the best is reported")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: process CPU time (steadier on a shared machine; threads' time adds up)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled contenders")
    parser.add_argument("--nanochat-dir", default=None, help="karpathy/nanochat checkout (commit 10231df)")
    parser.add_argument("--nanochat-python", default=None, help="python of a venv that runs that checkout")
    parser.add_argument("--memory", action="store_true", help="add peak RSS at the tiny and d12 shapes")
    parser.add_argument("--memory-d12-compiled", action="store_true", help="also compile at d12 (slow on CPU)")
    parser.add_argument("--rss-child", choices=tuple(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--rss-compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.rss_compile, steps=8)))
        return

    clock = clock_fn(args.clock)
    model, tokenizer = load_model(args.checkpoint)
    c = model.config
    result: dict = {"bench": "decode", "depth": c.n_layer, "n_embd": c.n_embd, "vocab": c.vocab_size,
                    "params_M": round(model.num_params() / 1e6, 2), "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens, "threads": args.threads, "clock": args.clock,
                    "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "load_avg_1m": round(os.getloadavg()[0], 1)}
    gen = torch.Generator().manual_seed(0)
    step = None if args.no_compile else torch.compile(decode_forward, dynamic=False)
    first_prompt = None
    all_rows: dict[int, list[list[int]]] = {}
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(0, tokenizer.vocab_size - len(SPECIAL_TOKENS), (batch, args.prompt_len), generator=gen)
        first_prompt = first_prompt or prompts[0].tolist()
        rows = all_rows[batch] = prompts.tolist()
        eager = Engine(model, tokenizer, max_batch_size=batch, prefill_chunk=batch * args.prompt_len,
                       prefix_cache=False, compile=False)
        bare_eager(model, prompts, 4, clock)  # warm-up
        engine_run(eager, rows, 4, clock)
        bare, bare_ids = best_of(args.repeat, bare_eager, model, prompts, args.new_tokens, clock)
        eng, eng_ids = best_of(args.repeat, engine_run, eager, rows, args.new_tokens, clock)
        result |= {f"bare_eager_tok_s_b{batch}": round(bare, 1), f"engine_eager_tok_s_b{batch}": round(eng, 1),
                   f"engine_vs_bare_eager_b{batch}": round(eng / bare, 2)}
        same = eng_ids == bare_ids
        if step is not None:
            start = time.perf_counter()
            bare_compiled(model, prompts, 2, clock, step)  # builds the graph for this batch
            result[f"compile_s_bare_b{batch}"] = round(time.perf_counter() - start, 1)
            compiled = Engine(model, tokenizer, max_batch_size=batch, prefill_chunk=batch * args.prompt_len,
                              prefix_cache=False, compile=True)
            start = time.perf_counter()
            engine_run(compiled, rows, 3, clock)  # builds the graph of this batch's bucket (same code: cache hit)
            result[f"compile_s_engine_b{batch}"] = round(time.perf_counter() - start, 1)
            cbare, cbare_ids = best_of(args.repeat, bare_compiled, model, prompts, args.new_tokens, clock, step)
            ceng, ceng_ids = best_of(args.repeat, engine_run, compiled, rows, args.new_tokens, clock)
            result |= {f"bare_compiled_tok_s_b{batch}": round(cbare, 1),
                       f"engine_compiled_tok_s_b{batch}": round(ceng, 1),
                       f"engine_compiled_vs_bare_compiled_b{batch}": round(ceng / cbare, 2),
                       f"compiled_vs_eager_engine_b{batch}": round(ceng / eng, 2),
                       f"engine_compiled_still_compiled_b{batch}": compiled.decode_compiled}
            same = same and ceng_ids == eng_ids and cbare_ids == bare_ids
        result[f"same_ids_b{batch}"] = same
    if step is not None:
        result |= auto_engine(args, model, tokenizer, all_rows, clock)
    if args.nanochat_dir and args.nanochat_python:
        nc = nanochat_run(args, model, tokenizer, first_prompt)
        ours = Engine(model, tokenizer, max_batch_size=1, prefix_cache=False, compile=False)
        _, our_ids = engine_run(ours, [first_prompt], args.new_tokens, clock)
        best_ours = max(result.get("engine_compiled_tok_s_b1", 0.0), result.get("engine_eager_tok_s_b1", 0.0))
        result |= {"nanochat_engine_tok_s_b1": nc["tok_s"], "nanochat_same_ids_b1": nc["ids"] == our_ids[0],
                   "engine_eager_vs_nanochat_b1": round(result.get("engine_eager_tok_s_b1", 0) / nc["tok_s"], 2),
                   "engine_best_vs_nanochat_b1": round(best_ours / nc["tok_s"], 2)}
        if "engine_auto_tok_s_b1" in result:
            result["engine_auto_vs_nanochat_b1"] = round(result["engine_auto_tok_s_b1"] / nc["tok_s"], 2)
    else:
        result["nanochat"] = "skipped: pass --nanochat-dir and --nanochat-python to compare with nanochat's engine"
    if args.memory:
        result |= memory_report(args.threads, args.memory_d12_compiled)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
