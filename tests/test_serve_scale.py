"""Replicas: autoscaling under real load (and back, to zero), prefix-affinity routing across replicas.

Fast tests cover the router's pure parts (request text, prefix keys, the affinity table), the
``--replicas`` flag and the builder's layouts. The slow ones share ONE module-scoped Serve app in
the prefix-routing layout (``NanochatIngress`` → ``NanochatServer`` engine replicas, min 0 / max 2,
fast autoscaling) on a tiny real checkpoint: real HTTP, the real ``openai`` async client, Serve's own
status API for replica counts, and the engine's own prefix-cache counters (reported by each replica
through ``record_routing_stats``) for hit rates.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _helpers_serve import build_tiny_checkpoint, free_port, wait_healthy  # noqa: E402

MODEL = "tiny-scale"
APP = "scale"
DEPLOYMENT = "NanochatServer"


# ---- fast: the router's parts, the flag, the layouts ------------------------------------------------


def _chat(messages):
    from nanochat.serve.openai_types import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"messages": messages})


def test_a_conversations_prefix_keys_are_a_prefix_of_its_next_turns():
    from nanochat.serve.router import prefix_keys, routing_text

    turn1 = [{"role": "system", "content": "You are terse. " * 4}, {"role": "user", "content": "Tell me about owls " * 3}]
    turn2 = turn1 + [{"role": "assistant", "content": "Owls hunt at night."}, {"role": "user", "content": "And bats?"}]
    other = [{"role": "system", "content": "You are terse. " * 4}, {"role": "user", "content": "Tell me about cats " * 3}]
    k1, k2, k3 = (prefix_keys(routing_text(_chat(m))) for m in (turn1, turn2, other))
    assert len(k1) >= 3 and k2[: len(k1)] == k1 and len(k2) > len(k1)
    shared = next(i for i, (a, b) in enumerate(zip(k1, k3)) if a != b)
    assert 0 < shared < len(k1)  # same system prompt: the first blocks agree, then the user text differs
    assert routing_text("chat") is None and routing_text(object()) is None


def test_completion_prompts_of_every_shape_have_a_routing_text():
    from nanochat.serve.openai_types import CompletionRequest
    from nanochat.serve.router import prefix_keys, routing_text

    for prompt in ("a b c " * 40, ["x" * 100, "y"], [5, 6, 7] * 30, [[1, 2] * 40, [3]]):
        text = routing_text(CompletionRequest.model_validate({"prompt": prompt}))
        assert text and prefix_keys(text)
    assert prefix_keys("\ud800" * 100)  # a lone surrogate (valid JSON) hashes instead of raising


def test_affinity_table_finds_the_longest_held_prefix_among_live_replicas_and_stays_bounded():
    from nanochat.serve.router import AffinityTable

    table = AffinityTable(max_entries=6)
    table.insert([b"a", b"b"], "r1")
    table.insert([b"a", b"b", b"c", b"d"], "r2")
    assert table.lookup([b"a", b"b", b"c", b"x"]) == ("r2", 3)
    assert table.lookup([b"a", b"b", b"c"], among={"r1"}) == (None, 0)  # r2 took over a and b too
    table.insert([b"e"], "r1")
    assert table.lookup([b"e", b"z"]) == ("r1", 1)
    table.forget({"r2"})
    assert table.lookup([b"a", b"b", b"c"]) == (None, 0) and table.lookup([b"e"]) == ("r1", 1)
    table.insert([bytes([i]) for i in range(10)], "r3")
    assert len(table) == 6 and table.lookup([b"e"]) == (None, 0)  # least recently used went first


def test_replicas_flag_takes_n_or_min_max():
    from nanochat.commands.serve import parse_replicas

    assert parse_replicas("2") == (2, 2) and parse_replicas("1:4") == (1, 4) and parse_replicas("0:2") == (0, 2)
    for bad in ("0", "3:2", "-1:2", "a:b", "1:", "1:2:3"):
        with pytest.raises(argparse.ArgumentTypeError, match="MIN"):
            parse_replicas(bad)


def test_api_errors_cross_a_serve_handle_with_every_field():
    from nanochat.serve.openai_types import APIError

    err = pickle.loads(pickle.dumps(APIError(429, "busy", type="rate_limit_error", code="queue_full",
                                             headers={"Retry-After": "1"})))
    assert (err.status, err.message, err.type, err.code, err.headers) == (429, "busy", "rate_limit_error",
                                                                          "queue_full", {"Retry-After": "1"})


def test_the_layout_follows_the_replica_range_and_the_router(tmp_path, tiny_tokenizer, tiny_model_factory):
    from nanochat.serve.build import build_app_with

    ckpt = build_tiny_checkpoint(tmp_path, tiny_tokenizer, tiny_model_factory, tag=MODEL)

    def deployments(overrides, deployment=None):
        from ray.serve import Application

        out, todo = {}, [build_app_with({"checkpoint": str(ckpt), "overrides": overrides}, deployment)]
        while todo:
            bound = todo.pop()._bound_deployment
            out[bound.name] = bound
            todo += [a for a in bound.init_args if isinstance(a, Application)]
        return out

    assert list(deployments([])) == ["NanochatServer"]  # one replica: ingress and model in one
    assert list(deployments(["max_replicas=2", "router=power_of_two"])) == ["NanochatServer"]
    routed = deployments(["min_replicas=0", "max_replicas=3"])
    assert sorted(routed) == ["NanochatIngress", "NanochatServer"]
    engine, ingress = routed["NanochatServer"], routed["NanochatIngress"]
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (0, 1, 3)
    assert engine._deployment_config.request_router_config.request_router_class.endswith("PrefixAffinityRouter")
    assert engine.ray_actor_options["num_cpus"] == 0.5 and ingress.ray_actor_options["num_cpus"] == 0
    assert ingress.num_replicas == 1 and ingress.max_ongoing_requests >= 3 * engine.max_ongoing_requests
    # a config's fixed replica count also chooses the layout
    assert len(deployments([], {"num_replicas": 2})) == 2


# ---- slow: one autoscaled app in the prefix-routing layout -------------------------------------------


def _deploy(ckpt: Path, min_replicas: int, max_replicas: int, affinity: bool = True) -> None:
    from ray import serve

    from nanochat.serve.build import build_app_with

    overrides = [f"min_replicas={min_replicas}", f"max_replicas={max_replicas}", "target_ongoing_requests=2",
                 "upscale_delay_s=1", "downscale_delay_s=3", "max_batch_size=8", "max_new_tokens=16",
                 "compile=false"]  # no compile at each replica start (CI time; docs/engine.md)
    deployment = {
        "autoscaling_config": {"metrics_interval_s": 0.5, "look_back_period_s": 2.0},
        "request_router_config": {"request_router_kwargs": {"affinity": affinity},
                                  "request_routing_stats_period_s": 0.5},
        "graceful_shutdown_timeout_s": 5, "graceful_shutdown_wait_loop_s": 0.5,
    }
    app = build_app_with({"checkpoint": str(ckpt), "overrides": overrides}, deployment)
    serve.run(app, name=APP, route_prefix="/", blocking=False)


def _running(deployment: str = DEPLOYMENT) -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def _wait(predicate, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s")


@pytest.fixture(scope="module")
def scaled(ray_session, tmp_path_factory, tiny_tokenizer, tiny_model_factory):
    """ONE app for the module: prefix routing, 0..2 engine replicas scaling on 2 ongoing requests each."""
    from ray import serve

    root = tmp_path_factory.mktemp("serve_scale")
    ckpt = build_tiny_checkpoint(root, tiny_tokenizer, tiny_model_factory, tag=MODEL)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    _deploy(ckpt, 0, 2)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(f"{base}/health")
    yield {"base": base, "checkpoint": ckpt}
    serve.shutdown()


def _stats(base: str) -> dict:
    return httpx.get(base + "/stats", timeout=30).json()


async def _stream(client, messages: list[dict], seed: int) -> tuple[str, float, int]:
    """One streamed chat turn: (reply text, seconds to the first chunk with content or a finish, prompt
    tokens from the usage chunk)."""
    start, first, text, finish, prompt_tokens = time.perf_counter(), None, "", None, 0
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, seed=seed,
                                                  temperature=1.0, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        prompt_tokens = chunk.usage.prompt_tokens if chunk.usage else prompt_tokens
        for choice in chunk.choices:
            if first is None and (choice.delta.content or choice.finish_reason):
                first = time.perf_counter() - start
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish in ("stop", "length") and prompt_tokens > 0
    return text, first if first is not None else time.perf_counter() - start, prompt_tokens


@pytest.mark.slow
def test_load_scales_to_a_second_replica_and_back_to_zero_with_no_failed_request(scaled):
    import openai

    base = scaled["base"]  # 1 engine replica at start, or already 0 if the app sat idle past its delay
    outcomes: list[str] = []
    stop = asyncio.Event()

    async def user(client, u: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            messages = [{"role": "user", "content": f"User {u} request {i}: tell me something new about the sea."}]
            try:
                await _stream(client, messages, seed=u * 1000 + i)
                outcomes.append("ok")
            except Exception as err:  # noqa: BLE001  (every failure is counted, and the test fails on any)
                outcomes.append(f"{type(err).__name__}: {err}")

    async def drive() -> tuple[int, int]:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        users = [asyncio.create_task(user(client, u)) for u in range(6)]
        loop = asyncio.get_running_loop()
        try:
            peak = await loop.run_in_executor(None, _wait, lambda: _running() >= 2 and _running(), 180,
                                              "a second replica under load")
            # keep the load on until the new replica has served requests (both report some)
            served = await loop.run_in_executor(None, _wait, lambda: _two_replicas_served(base), 120,
                                                "requests on both replicas")
        finally:
            stop.set()
            await asyncio.gather(*users)
        return peak, served

    peak, served = asyncio.run(drive())
    assert peak == 2 and served == 2
    failed = [o for o in outcomes if o != "ok"]
    assert len(outcomes) > 12 and not failed, failed[:5]
    # load gone: back down to zero replicas (min_replicas 0); the ingress stays up
    _wait(lambda: _running() == 0, 120, "scale to zero after the load")
    assert _running("NanochatIngress") == 1
    # a request now waits for a cold start, and succeeds
    start = time.perf_counter()
    r = httpx.post(base + "/v1/chat/completions", timeout=180,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "wake up"}], "max_tokens": 4})
    cold = time.perf_counter() - start
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    assert _running() >= 1
    print(f"\nrequests during the scale-up: {len(outcomes)}, failed: 0; cold start from zero replicas: {cold:.1f} s")


def _two_replicas_served(base: str) -> int:
    reports = _stats(base).get("model_replicas", {})
    busy = [r for r in reports.values() if r.get("total_requests", 0) > 0]
    return len(busy) if len(busy) >= 2 else 0


def _settled(base: str) -> bool:
    """The replicas' latest reports count every request the ingress's router sent them."""
    stats = _stats(base)
    reported = sum(r.get("total_requests", 0) for r in stats.get("model_replicas", {}).values())
    return bool(stats.get("router")) and reported == stats["router"]["routed"]


def _conversations(base: str, tag: str, conversations: int = 6, turns: int = 4) -> dict:
    """``conversations`` multi-turn chats at once, ``turns`` each, every user pausing 0-0.3 s (seeded)
    before each turn so that the chats do not advance in lock-step (then power of two would repeat one
    placement every wave and look affine by accident). Returns the prefix-cache figures over their
    requests, from the replicas' own counters: ``hit_rate`` (lookups that reused a prefix) and
    ``token_hit_rate`` (prompt tokens whose KV was reused, as vLLM counts its prefix-cache hit rate),
    plus the router's count of follow-ups sent to the replica holding their prefix and the median TTFT
    of the follow-up turns."""
    import random

    import openai

    _wait(lambda: _settled(base), 60, "the replicas' reports caught up")
    before = _stats(base)

    async def one(client, c: int) -> tuple[list[float], int]:
        history, ttfts, prompt_tokens, think = [], [], 0, random.Random(c)
        for t in range(turns):
            await asyncio.sleep(think.uniform(0, 0.3))
            # distinct from the first character on: no two chats share a prefix the cache could reuse
            history.append({"role": "user", "content": f"{chr(65 + c)}{chr(97 + c)} {tag} turn {t}: what else?"})
            reply, ttft, prompt = await _stream(client, history, seed=c * 100 + t)
            history.append({"role": "assistant", "content": reply or "ok"})
            ttfts += [ttft] if t else []
            prompt_tokens += prompt
        return ttfts, prompt_tokens

    async def run() -> tuple[list[float], int]:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        done = await asyncio.gather(*(one(client, c) for c in range(conversations)))
        return sorted(x for ttfts, _ in done for x in ttfts), sum(n for _, n in done)

    ttfts, prompt_tokens = asyncio.run(run())
    _wait(lambda: _settled(base), 60, "every lookup reported by the replicas")
    after = _stats(base)
    cache = {k: after["prefix_cache"][k] - before["prefix_cache"][k] for k in ("hits", "misses", "tokens_reused")}
    return {"hit_rate": round(cache["hits"] / (cache["hits"] + cache["misses"]), 3),
            "token_hit_rate": round(cache["tokens_reused"] / prompt_tokens, 3),
            "lookups": cache["hits"] + cache["misses"], "tokens_reused": cache["tokens_reused"],
            "prompt_tokens": prompt_tokens, "to_holder": after["router"]["affine"] - before["router"]["affine"],
            "follow_up_ttft_p50_ms": round(ttfts[len(ttfts) // 2] * 1000, 1)}


@pytest.mark.slow
def test_prefix_affinity_raises_the_multi_turn_prefix_cache_hit_rate_over_power_of_two(scaled):
    from ray import serve

    base, ckpt = scaled["base"], scaled["checkpoint"]
    figures = {}
    for policy, affinity in (("affinity", True), ("power_of_two", False)):
        serve.delete(APP)  # a fresh ingress: a router takes its kwargs when it is created
        _deploy(ckpt, 2, 2, affinity=affinity)
        wait_healthy(f"{base}/health")
        _wait(lambda: _running() == 2, 180, "two engine replicas")
        _prime(base)  # the ingress's router exists from its first request on
        _wait(lambda: len(_stats(base).get("model_replicas", {})) == 2, 60, "the router sees both replicas")
        figures[policy] = _conversations(base, tag=policy[:3])
        assert _stats(base)["router"]["policy"] == ("prefix_affinity" if affinity else "power_of_two")
    print(f"\nmulti-turn prefix-cache hit rate / follow-up TTFT over 2 replicas: {figures}")
    # 6 chats x 4 turns: affinity sends every follow-up to the replica holding its whole history (18 of
    # 18); power of two picks it about half the time, and reuses only an older turn's prefix otherwise.
    # The token hit rate is the figure asserted: a lookup "hit" also counts power of two's partial reuse
    # of an older turn (once a chat has visited both replicas, every later lookup hits something).
    assert figures["affinity"]["to_holder"] >= 15
    assert figures["affinity"]["token_hit_rate"] > figures["power_of_two"]["token_hit_rate"]
    assert figures["affinity"]["hit_rate"] >= 0.6


def _prime(base: str) -> None:
    r = httpx.post(base + "/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1})
    assert r.status_code == 200


@pytest.mark.slow
def test_refusals_from_an_engine_replica_reach_the_client_through_the_ingress_unchanged(scaled):
    import openai

    base = scaled["base"]
    long = [{"role": "user", "content": "hi"}]
    for stream in (False, True):  # the replica refuses (400), sent back through the handle as a value
        r = httpx.post(base + "/v1/chat/completions", timeout=180,
                       json={"model": MODEL, "messages": long, "max_tokens": 100_000, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={"model": "nope", "messages": long})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"  # the ingress alone
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=180)
    assert [m.id for m in client.models.list().data] == [MODEL]
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, seed=1)
    assert text.object == "text_completion" and text.usage.completion_tokens <= 4
    assert httpx.post(base + "/cache/invalidate", timeout=60).status_code == 501
