"""Prefix-affinity routing: send a request to the replica that already holds its longest prefix.

A multi-turn chat resends its whole history every turn, and each replica's engine keeps the KV of
the conversations it served (:mod:`nanochat.prefix_cache`). Sending the next turn to the replica
that served the previous one turns most of its prefill into a cache hit; Serve's default router
(power of two choices) sends it to the less busy of two random replicas, so with N replicas a turn
finds its history only about 1/N of the time.

:class:`PrefixAffinityRouter` is a Serve request router (the public API: ``RequestRouterConfig`` on
the deployment, base class ``ray.serve.request_router.RequestRouter``). It follows the design of
Ray's ``PrefixCacheAffinityRouter`` (``ray.serve.llm``, which imports only with vLLM installed), in
a few lines: it remembers its own past decisions in an :class:`AffinityTable`, a bounded LRU map
from chained hashes of the request text's fixed-size blocks to the replica the text went to. A
request goes to the replica holding its longest known block-aligned prefix, unless that replica has
more than ``imbalance`` requests in flight beyond the least loaded one; requests with no known prefix
(first turns) and imbalanced ones get power of two choices. The router lives in the process holding
the deployment handle (the ingress replica), where the request is already parsed: Serve's HTTP
proxy forwards only headers to a replica, so it could not route on the body itself.

Replicas report what they hold through Serve's ``record_routing_stats`` (scheduler and prefix-cache
statistics, see :meth:`nanochat.serve.app.NanochatModel.record_routing_stats`); :func:`router_stats`
returns the latest report of each replica, for ``/stats``. Torch-free and tokenizer-free: it hashes
the text the client sent (chat ``messages`` or completion ``prompt``), not tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

ROUTER_PATH = "nanochat.serve.router.PrefixAffinityRouter"  # request_router_class in a Serve config
BLOCK_CHARS = 64  # the prefix granularity: a cached prefix is matched in whole blocks
MAX_CHARS = 65536  # text beyond this is not hashed (its prefix already decides)
_MESSAGE_END = "\x1e"  # between messages: a conversation's text is a prefix of its next turn's


def routing_text(request: Any) -> str | None:
    """The text a request's prefix is matched on: chat ``messages`` (one canonical JSON per message,
    so a conversation's text is a prefix of its next turn's) or a completion ``prompt``; None if
    ``request`` has neither (it is then routed by power of two choices)."""
    messages = getattr(request, "messages", None)
    if isinstance(messages, Sequence) and not isinstance(messages, str):
        return "".join(_canonical(m) + _MESSAGE_END for m in messages)
    prompt = getattr(request, "prompt", None)
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return prompt
    return "\x1d".join(p if isinstance(p, str) else _canonical(p) for p in prompt)


def prefix_keys(text: str, block_chars: int = BLOCK_CHARS) -> list[bytes]:
    """Chained hashes of ``text``'s whole blocks: ``keys[i]`` identifies ``text[:(i + 1) * block_chars]``
    (a partial last block has no key). Stable across processes (BLAKE2b, not ``hash``)."""
    data = text[:MAX_CHARS].encode("utf-8", "surrogatepass")  # lone surrogates are valid JSON text
    keys: list[bytes] = []
    digest = b""
    for start in range(0, len(data) - block_chars + 1, block_chars):
        digest = hashlib.blake2b(digest + data[start : start + block_chars], digest_size=8).digest()
        keys.append(digest)
    return keys


class AffinityTable:
    """Bounded LRU map from prefix keys to the replica that last received that prefix."""

    def __init__(self, max_entries: int = 200_000):
        self.max_entries = max_entries
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def lookup(self, keys: Sequence[bytes], among: set[str] | None = None) -> tuple[str | None, int]:
        """``(replica, blocks)``: the replica holding the longest prefix of ``keys`` (restricted to
        ``among`` when given) and how many blocks it holds; ``(None, 0)`` if none holds any."""
        for i in range(len(keys) - 1, -1, -1):
            owner = self._owner.get(keys[i])
            if owner is not None and (among is None or owner in among):
                return owner, i + 1
        return None, 0

    def insert(self, keys: Sequence[bytes], replica: str) -> None:
        """Record that ``replica`` now holds every prefix in ``keys`` (evicting the least recently used)."""
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replicas: set[str]) -> None:
        """Drop every prefix held by ``replicas`` (they stopped)."""
        if replicas:
            self._owner = OrderedDict((k, r) for k, r in self._owner.items() if r not in replicas)


# Serve pickles this module BY VALUE with the router class (RequestRouterConfig), so the class in the
# ingress process has its own copy of these globals: it must reach the imported module's registry
# through a runtime import (see PrefixAffinityRouter.initialize_state), and reference no lock itself.
_live: dict[tuple[str, str], weakref.ref] = {}  # (app, deployment) -> the router of this process
_live_lock = threading.Lock()


def register(router: PrefixAffinityRouter, app: str, deployment: str) -> None:
    """Make ``router`` the one :func:`router_stats` reads for ``app``/``deployment`` in this process."""
    with _live_lock:
        _live[(app, deployment)] = weakref.ref(router)


def router_stats(app: str, deployment: str) -> dict[str, Any]:
    """What this process's router for ``app``/``deployment`` knows: ``replicas`` (the latest
    ``record_routing_stats`` report of each running replica, by replica id) and ``router`` (policy,
    requests routed, how many went to a replica that already held a prefix of theirs, prefixes
    remembered). ``{}`` before the first request routed from this process."""
    with _live_lock:
        ref = _live.get((app, deployment))
    router = ref() if ref is not None else None
    if router is None:
        return {}
    replicas = {r.replica_id.unique_id: dict(r.routing_stats or {}) for r in list(router.curr_replicas.values())}
    policy = "prefix_affinity" if router.affinity else "power_of_two"
    return {"replicas": replicas, "router": {"policy": policy, "routed": router.routed, "affine": router.affine,
                                             "prefixes": len(router.table), "in_flight": dict(router.in_flight)}}


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Routes to the replica holding a request's longest known prefix; power of two choices otherwise.

    No ``FIFOMixin``: a replica found for one request must serve that request, not the oldest pending
    one. ``request_router_kwargs`` (see :meth:`initialize_state`) tune it.
    """

    def initialize_state(self, affinity: bool = True, imbalance: int = 8, block_chars: int = BLOCK_CHARS,
                         max_entries: int = 200_000, **_: Any) -> None:
        """``affinity``: False routes by power of two choices only (Serve's default policy; for A/B
        measurements on the same deployment). ``imbalance``: in-flight requests the preferred replica may
        have beyond the least loaded candidate before affinity yields to balance. ``block_chars``: prefix
        granularity. ``max_entries``: prefix keys remembered (LRU)."""
        self.affinity, self.imbalance, self.block_chars = affinity, imbalance, block_chars
        self.table = AffinityTable(max_entries)
        self.routed = self.affine = 0  # requests routed / sent to the replica holding their prefix
        self.in_flight: dict[str, int] = {}  # by replica: routed from here and not completed yet
        if self._deployment_id is not None:
            import nanochat.serve.router as home  # the imported module, not this class's pickled copy

            home.register(self, self._deployment_id.app_name, self._deployment_id.name)

    # ---- choosing ------------------------------------------------------------------------------

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas to try in order: ``[[preferred], two random]`` when a replica holds a prefix
        of the request and is not overloaded, else ``[two random]`` (Serve then takes the one with the
        shorter queue that accepts)."""
        candidate_ids = self.apply_locality_routing(pending_request=pending_request)
        if not candidate_ids:
            return []
        fallback = [self._replicas[rid] for rid in random.sample(list(candidate_ids), min(2, len(candidate_ids)))]
        if not self.affinity or pending_request is None:
            return [fallback]
        keys = self._keys(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        owner, _ = self.table.lookup(keys, among=set(by_id))
        if owner is None or self._overloaded(by_id[owner], candidate_replicas):
            return [fallback]
        return [[by_id[owner]], fallback]

    def _overloaded(self, replica: RunningReplica, candidates: list[RunningReplica]) -> bool:
        """More than ``imbalance`` requests in flight beyond the least busy candidate (counted here, from
        routed to completed: exact for this ingress's own traffic, with no probe of the replicas)."""
        busy = self.in_flight.get
        least = min(busy(r.replica_id.unique_id, 0) for r in candidates)
        return busy(replica.replica_id.unique_id, 0) - least > self.imbalance

    def _keys(self, pending_request: PendingRequest) -> list[bytes]:
        for arg in list(pending_request.args) + list(pending_request.kwargs.values()):
            text = routing_text(arg)
            if text is not None:
                return prefix_keys(text, self.block_chars)
        return []

    # ---- learning ------------------------------------------------------------------------------

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Remember that ``replica_id`` now holds this request's prefixes (its engine caches them)."""
        super().on_request_routed(pending_request, replica_id, result)
        if pending_request is None:
            return
        self.routed += 1
        self.in_flight[replica_id.unique_id] = self.in_flight.get(replica_id.unique_id, 0) + 1
        keys = self._keys(pending_request)
        if not keys:
            return
        owner, _ = self.table.lookup(keys)
        self.affine += owner == replica_id.unique_id
        self.table.insert(keys, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        rid = replica_id.unique_id
        self.in_flight[rid] = max(self.in_flight.get(rid, 0) - 1, 0)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = {rid.unique_id for rid in self._replicas} - {r.replica_id.unique_id for r in replicas}
        super().update_replicas(replicas)
        self.table.forget(gone)
        for rid in gone:
            self.in_flight.pop(rid, None)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget({replica_id.unique_id})


def _canonical(value: Any) -> str:
    if hasattr(value, "model_dump_json"):
        return value.model_dump_json()
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
