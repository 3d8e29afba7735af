from __future__ import annotations

import pytest

from control_plane.registry import Registry
from control_plane.state import NodeState, Thresholds
from gazsi_cluster.errors import AuthenticationError, Conflict, InvalidRequest, RateLimited, UnknownNode
from gazsi_cluster.protocol import NodeFacts, NodeLoad

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def facts(node_id: str | None = None, port: int = 9000, **kw: object) -> NodeFacts:
    base = dict(node_id=node_id, address="127.0.0.1", port=port, engine_backend="fake",
                models=["all-MiniLM-L6-v2"], max_batch_size=8, version="0.1.0")
    base.update(kw)
    return NodeFacts.model_validate(base)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reg(clock: Clock) -> Registry:
    return Registry(join_token="s3cret", clock=clock, thresholds=Thresholds())


def test_join_assigns_id_and_first_heartbeat_makes_healthy(reg: Registry) -> None:
    rec = reg.join(facts(), "s3cret")
    assert rec.node_id.startswith("n-")
    assert rec.state is NodeState.JOINING
    assert len(reg.snapshot()) == 0  # joining nodes get no traffic yet
    reg.heartbeat(rec.node_id, NodeLoad(queue_depth=3))
    assert rec.state is NodeState.HEALTHY
    table = reg.snapshot()
    assert [n.node_id for n in table.nodes] == [rec.node_id]
    assert table.nodes[0].queue_depth == 3


def test_wrong_or_missing_token_is_refused(reg: Registry) -> None:
    with pytest.raises(AuthenticationError):
        reg.join(facts(), "wrong")
    with pytest.raises(AuthenticationError, match="no join token given"):
        reg.join(facts(), None)
    # Counted apart (issue 17): a missing token is a misconfigured node, a wrong one may be a guess.
    assert reg.rejected["bad_token"] == 1 and reg.rejected["no_token"] == 1
    assert not reg.nodes


def test_state_machine_suspect_dead_removed(reg: Registry, clock: Clock) -> None:
    rec = reg.join(facts("a"), "s3cret")
    reg.heartbeat("a", NodeLoad())
    clock.advance(1.9)
    reg.sweep()
    assert rec.state is NodeState.HEALTHY
    clock.advance(0.2)  # 2.1 s silent: two missed heartbeats
    reg.sweep()
    assert rec.state is NodeState.SUSPECT
    assert len(reg.snapshot()) == 0
    reg.heartbeat("a", NodeLoad())  # it comes back
    assert rec.state is NodeState.HEALTHY
    clock.advance(3.0)
    reg.sweep()
    assert rec.state is NodeState.DEAD
    clock.advance(reg.thresholds.removed_after_s + 0.1)
    reg.sweep()
    assert "a" not in reg.nodes
    with pytest.raises(UnknownNode):
        reg.heartbeat("a", NodeLoad())


def test_dead_node_leaves_table_within_3s_at_defaults(reg: Registry, clock: Clock) -> None:
    reg.join(facts("a"), "s3cret")
    reg.join(facts("b", port=9001), "s3cret")
    reg.heartbeat("a", NodeLoad())
    reg.heartbeat("b", NodeLoad())
    assert len(reg.snapshot()) == 2
    gone_at = None
    for step in range(1, 40):  # 0.1 s sweeps, as the service runs them; only b keeps beating
        clock.advance(0.1)
        if step % 10 == 0:
            reg.heartbeat("b", NodeLoad())
        reg.sweep()
        if "a" not in reg.snapshot().by_id and gone_at is None:
            gone_at = step / 10
    assert gone_at is not None and gone_at <= 3.0
    assert reg.nodes["a"].state is NodeState.DEAD
    assert list(reg.snapshot().by_id) == ["b"]


def test_duplicate_live_id_refused_but_restart_from_same_place_replaces(reg: Registry) -> None:
    reg.join(facts("a", port=9000), "s3cret")
    reg.heartbeat("a", NodeLoad())
    with pytest.raises(Conflict):
        reg.join(facts("a", port=9100), "s3cret")
    # Same address and port: the node restarted; its old entry is replaced cleanly.
    rec = reg.join(facts("a", port=9000), "s3cret")
    assert rec.state is NodeState.JOINING and reg.nodes["a"] is rec
    # A node proving its id with its certificate may move.
    moved = reg.join(facts("a", port=9200), "s3cret", proven_id="a")
    assert moved.facts.port == 9200
    assert len(reg.nodes) == 1


def test_dead_entry_is_replaced(reg: Registry, clock: Clock) -> None:
    reg.join(facts("a", port=9000), "s3cret")
    reg.heartbeat("a", NodeLoad())
    clock.advance(5)
    reg.sweep()
    assert reg.nodes["a"].state is NodeState.DEAD
    assert reg.join(facts("a", port=9999), "s3cret").facts.port == 9999


def test_registration_flood_is_rate_limited(clock: Clock) -> None:
    reg = Registry(join_token=None, clock=clock, join_rate_per_s=5, join_burst=10)
    for i in range(10):
        reg.join(facts(port=1000 + i), None)
    with pytest.raises(RateLimited) as exc:
        reg.join(facts(port=2000), None)
    assert exc.value.retry_after == pytest.approx(0.2)
    clock.advance(0.2)
    reg.join(facts(port=2001), None)
    assert reg.rejected["join_rate"] == 1


@pytest.mark.parametrize(
    "load",
    [
        NodeLoad(p50_ms=50, p99_ms=10),
        NodeLoad(mean_batch_size=100),  # max_batch_size is 8
        NodeLoad(queue_depth=10**9),
    ],
)
def test_impossible_heartbeat_values_rejected(reg: Registry, load: NodeLoad) -> None:
    rec = reg.join(facts("a"), "s3cret")
    with pytest.raises(InvalidRequest):
        reg.heartbeat("a", load)
    assert rec.heartbeats == 0
    assert reg.rejected["impossible_load"] == 1


def test_gpu_memory_above_capacity_rejected(reg: Registry) -> None:
    reg.join(facts("g", gpu_model="H100", gpu_memory_mb=80_000), "s3cret")
    with pytest.raises(InvalidRequest):
        reg.heartbeat("g", NodeLoad(gpu_memory_used_mb=90_000))
    reg.heartbeat("g", NodeLoad(gpu_memory_used_mb=70_000))


def test_unknown_node_heartbeat_rejected(reg: Registry) -> None:
    with pytest.raises(UnknownNode):
        reg.heartbeat("nope", NodeLoad())
    assert reg.rejected["unknown_node"] == 1


def test_drain_takes_node_out_of_table_and_keeps_it_listed(reg: Registry) -> None:
    reg.join(facts("a"), "s3cret")
    reg.heartbeat("a", NodeLoad())
    reg.drain("a")
    assert reg.nodes["a"].state is NodeState.DRAINING
    assert len(reg.snapshot()) == 0
    reg.heartbeat("a", NodeLoad())  # still draining after heartbeats
    assert reg.nodes["a"].state is NodeState.DRAINING
    reg.remove("a")
    assert "a" not in reg.nodes


def test_node_reporting_draining_leaves_table(reg: Registry) -> None:
    reg.join(facts("a"), "s3cret")
    reg.heartbeat("a", NodeLoad())
    reg.heartbeat("a", NodeLoad(draining=True))
    assert len(reg.snapshot()) == 0


def test_restore_keeps_nodes_routable_for_a_grace_period(reg: Registry, clock: Clock) -> None:
    reg.join(facts("a"), "s3cret")
    reg.heartbeat("a", NodeLoad())
    old = list(reg.nodes.values())
    fresh = Registry(join_token="s3cret", clock=clock)
    assert fresh.restore(old) == 1
    assert list(fresh.snapshot().by_id) == ["a"]
    clock.advance(2.5)
    fresh.sweep()
    assert len(fresh.snapshot()) == 0


def test_snapshot_versions(reg: Registry) -> None:
    reg.join(facts("a"), "s3cret")
    reg.heartbeat("a", NodeLoad())
    t1 = reg.snapshot()
    assert reg.snapshot() is t1  # nothing changed: same object
    reg.heartbeat("a", NodeLoad(queue_depth=5))
    t2 = reg.snapshot()
    assert t2.version == t1.version + 1
    assert t2.membership_version == t1.membership_version
    reg.join(facts("b", port=9001), "s3cret")
    reg.heartbeat("b", NodeLoad())
    assert reg.snapshot().membership_version > t2.membership_version
