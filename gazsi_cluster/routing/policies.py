"""Routing policies behind one interface: pick a node from a :class:`RoutingTable` snapshot.

Every decision is local and uses only what nodes pushed (no probes on the request path: Ray
Serve's 100 ms probes hurt over a WAN). Expensive structures (hash rings, WRR sequences) are
cached per ``membership_version``, so a decision is O(1) or O(log n) in the number of nodes.

>>> table = RoutingTable(1, 1, (NodeEntry("a", "http://a"), NodeEntry("b", "http://b")))
>>> make_policy("hash").choose(table, RouteRequest(key="hello")).node_id in {"a", "b"}
True
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from gazsi_cluster.errors import NoHealthyNode
from gazsi_cluster.routing.table import NodeEntry, RoutingTable

__all__ = [
    "AffinityPolicy",
    "ConsistentHashPolicy",
    "LatencyEWMAPolicy",
    "PowerOfTwoPolicy",
    "RouteRequest",
    "RoutingPolicy",
    "WeightedRoundRobinPolicy",
    "make_policy",
]

_RANDOM_TRIES = 8


@dataclass(slots=True)
class RouteRequest:
    """What a decision may look at: the model, a hashing key, the client's place, nodes to skip."""

    model: str | None = None
    key: str | bytes | None = None
    region: str | None = None
    zone: str | None = None
    exclude: frozenset[str] | set[str] = field(default_factory=frozenset)


def _no_node(req: RouteRequest) -> NoHealthyNode:
    what = f" serving model {req.model!r}" if req.model else ""
    return NoHealthyNode(f"no healthy node{what} is available", retry_after=1.0, model=req.model)


class RoutingPolicy(abc.ABC):
    """Base class; subclasses implement :meth:`_choose` over the model's candidates."""

    name: ClassVar[str]

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        # Requests this process has in flight per node: fresher than the pushed load.
        self.pending: dict[str, int] = {}

    def choose(self, table: RoutingTable, req: RouteRequest) -> NodeEntry:
        """Pick a node or raise :class:`NoHealthyNode` (503)."""
        node = self._choose(table, req)
        if node is None:
            raise _no_node(req)
        return node

    @abc.abstractmethod
    def _choose(self, table: RoutingTable, req: RouteRequest) -> NodeEntry | None: ...

    # -- feedback from the client ------------------------------------------------------------
    def on_start(self, node_id: str) -> None:
        self.pending[node_id] = self.pending.get(node_id, 0) + 1

    def on_finish(self, node_id: str, latency_s: float, ok: bool) -> None:
        left = self.pending.get(node_id, 1) - 1
        if left > 0:
            self.pending[node_id] = left
        else:
            self.pending.pop(node_id, None)

    # -- helpers -------------------------------------------------------------------------------
    def _random(self, cands: tuple[NodeEntry, ...], exclude: frozenset[str] | set[str]) -> NodeEntry | None:
        if not cands:
            return None
        for _ in range(_RANDOM_TRIES):
            n = cands[self._rng.randrange(len(cands))]
            if n.node_id not in exclude:
                return n
        # Most nodes excluded (small tables, many retries): fall back to a scan.
        rest = [n for n in cands if n.node_id not in exclude]
        return self._rng.choice(rest) if rest else None

    def _two(
        self, cands: tuple[NodeEntry, ...], exclude: frozenset[str] | set[str]
    ) -> tuple[NodeEntry | None, NodeEntry | None]:
        a = self._random(cands, exclude)
        if a is None or len(cands) == 1:
            return a, None
        b = self._random(cands, {*exclude, a.node_id})
        return a, b


class PowerOfTwoPolicy(RoutingPolicy):
    """Two random candidates, keep the less loaded (pushed load + this client's in-flight)."""

    name = "p2c"

    def _score(self, n: NodeEntry) -> float:
        return n.load_score + self.pending.get(n.node_id, 0) / max(1, n.max_batch_size)

    def _choose(self, table: RoutingTable, req: RouteRequest) -> NodeEntry | None:
        a, b = self._two(table.candidates(req.model), req.exclude)
        if a is None or b is None:
            return a
        return a if self._score(a) <= self._score(b) else b


class LatencyEWMAPolicy(PowerOfTwoPolicy):
    """Peak-EWMA (Finagle): cost = EWMA latency x (outstanding + 1), between two random candidates.

    The EWMA starts from the node's pushed p50 and moves with latencies this client observes.
    """

    name = "latency"

    def __init__(self, *, alpha: float = 0.3, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        self.alpha = alpha
        self.ewma_ms: dict[str, float] = {}

    def _score(self, n: NodeEntry) -> float:
        lat = self.ewma_ms.get(n.node_id) or n.p50_ms or 1.0
        return lat * (self.pending.get(n.node_id, 0) + n.queue_depth + n.in_flight + 1)

    def on_finish(self, node_id: str, latency_s: float, ok: bool) -> None:
        super().on_finish(node_id, latency_s, ok)
        ms = latency_s * 1000.0 if ok else max(latency_s * 1000.0, 1000.0)  # failures look slow
        prev = self.ewma_ms.get(node_id)
        self.ewma_ms[node_id] = ms if prev is None else prev + self.alpha * (ms - prev)


class AffinityPolicy(PowerOfTwoPolicy):
    """Prefer the client's zone, then its region, then the regions ``fallbacks`` lists for it (nearest
    first), then anywhere; p2c inside the chosen set. A failed node is excluded by the routing client,
    so its region empties and the request fails over to the next nearest region, not to any node."""

    name = "affinity"

    def __init__(self, *, region: str | None = None, zone: str | None = None, seed: int | None = None,
                 fallbacks: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__(seed=seed)
        self.region, self.zone = region, zone
        self.fallbacks = {k: tuple(v) for k, v in (fallbacks or {}).items()}
        self._cache_version = -1
        self._cache: dict[tuple[str, str | None, str | None], tuple[NodeEntry, ...]] = {}

    def _local(self, table: RoutingTable, region: str, zone: str | None, model: str | None) -> tuple[NodeEntry, ...]:
        if table.version != self._cache_version:
            self._cache_version, self._cache = table.version, {}
        key = (region, zone, model)
        got = self._cache.get(key)
        if got is None:
            nodes = table.in_region(region, zone)
            got = nodes if model is None else tuple(n for n in nodes if model in n.models)
            self._cache[key] = got
        return got

    def _choose(self, table: RoutingTable, req: RouteRequest) -> NodeEntry | None:
        region, zone = req.region or self.region, req.zone or self.zone
        if region:
            for z in ((zone, None) if zone else (None,)):
                a, b = self._two(self._local(table, region, z, req.model), req.exclude)
                if a is not None:
                    return a if b is None or self._score(a) <= self._score(b) else b
            for near in self.fallbacks.get(region, ()):
                a, b = self._two(self._local(table, near, None, req.model), req.exclude)
                if a is not None:
                    return a if b is None or self._score(a) <= self._score(b) else b
        return super()._choose(table, req)


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHashPolicy(RoutingPolicy):
    """Same input, same node (cache affinity); a node leaving moves only its own share of keys."""

    name = "hash"

    def __init__(self, *, vnodes: int = 64, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        self.vnodes = vnodes
        self._rings: dict[str | None, tuple[list[int], list[str]]] = {}
        self._ring_membership = -1

    def _ring(self, table: RoutingTable, model: str | None) -> tuple[list[int], list[str]]:
        if table.membership_version != self._ring_membership:
            self._rings, self._ring_membership = {}, table.membership_version
        ring = self._rings.get(model)
        if ring is None:
            cands = table.candidates(model)
            # Fewer virtual nodes on huge tables keeps the rebuild (once per membership) cheap.
            v = max(4, min(self.vnodes, 200_000 // max(1, len(cands))))
            points = sorted((_h64(f"{n.node_id}#{i}".encode()), n.node_id) for n in cands for i in range(v))
            ring = ([p[0] for p in points], [p[1] for p in points])
            self._rings[model] = ring
        return ring

    def _choose(self, table: RoutingTable, req: RouteRequest) -> NodeEntry | None:
        if req.key is None:
            return self._random(table.candidates(req.model), req.exclude)
        hashes, ids = self._ring(table, req.model)
        if not hashes:
            return None
        key = req.key.encode() if isinstance(req.key, str) else req.key
        i = bisect.bisect(hashes, _h64(key))
        for step in range(len(ids)):
            node_id = ids[(i + step) % len(ids)]
            if node_id not in req.exclude:
                node = table.by_id.get(node_id)
                if node is not None:
                    return node
        return None


class WeightedRoundRobinPolicy(RoutingPolicy):
    """Smooth weighted round robin: node with weight w appears w times, evenly spread."""

    name = "wrr"

    def __init__(self, *, seed: int | None = None) -> None:
        super().__init__(seed=seed)
        self._seqs: dict[str | None, list[str]] = {}
        self._membership = -1
        self._counter = 0

    def _seq(self, table: RoutingTable, model: str | None) -> list[str]:
        if table.membership_version != self._membership:
            self._seqs, self._membership = {}, table.membership_version
        seq = self._seqs.get(model)
        if seq is None:
            # Each of a node's w slots sits at (k + 0.5) / w of the cycle: an even interleave.
            slots = sorted(
                ((k + 0.5) / n.weight, n.node_id) for n in table.candidates(model) for k in range(max(1, n.weight))
            )
            seq = self._seqs[model] = [s[1] for s in slots]
        return seq

    def _choose(self, table: RoutingTable, req: RouteRequest) -> NodeEntry | None:
        seq = self._seq(table, req.model)
        for _ in range(len(seq)):
            self._counter += 1
            node_id = seq[self._counter % len(seq)]
            if node_id not in req.exclude:
                node = table.by_id.get(node_id)
                if node is not None:
                    return node
        return None


_POLICIES: dict[str, type[RoutingPolicy]] = {
    p.name: p
    for p in (PowerOfTwoPolicy, LatencyEWMAPolicy, AffinityPolicy, ConsistentHashPolicy, WeightedRoundRobinPolicy)
}


def make_policy(
    name: str, *, region: str | None = None, zone: str | None = None, seed: int | None = None,
    fallbacks: Mapping[str, Sequence[str]] | None = None,
) -> RoutingPolicy:
    """Build the policy named in ``control_plane.routing_policy`` (``fallbacks``: region -> nearest regions)."""
    if name == "affinity":
        return AffinityPolicy(region=region, zone=zone, seed=seed, fallbacks=fallbacks)
    try:
        return _POLICIES[name](seed=seed)
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; expected one of {sorted(_POLICIES)}") from None
