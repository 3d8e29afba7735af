"""The node's shared-memory limits table, within one process (across processes: the integration
tests in tests/integration/auth/test_limits_across_processes.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from gazsi_cluster.auth import shared_limits
from gazsi_cluster.auth.limits import Op, Outcome
from gazsi_cluster.auth.shared_limits import SharedBuckets
from gazsi_cluster.errors import ConfigError

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeMonotonic:
    fake = FakeMonotonic()
    monkeypatch.setattr(shared_limits.time, "monotonic", fake)
    return fake


@pytest.fixture
def table() -> Iterator[SharedBuckets]:
    with SharedBuckets.create(entries=1024, stripes=16) as t:
        yield t


def test_bucket_takes_up_to_capacity_then_refills(table: SharedBuckets, clock: FakeMonotonic) -> None:
    got = [table.acquire_now("rpm:k", capacity=60).allowed for _ in range(61)]
    assert got == [True] * 60 + [False]
    refused = table.acquire_now("rpm:k", capacity=60)
    assert refused.retry_after_s == pytest.approx(1.0) and refused.remaining == 0
    clock.now += 1.0  # 60/min refills one per second
    assert table.acquire_now("rpm:k", capacity=60).allowed
    assert not table.acquire_now("rpm:k", capacity=60).allowed
    assert table.acquire_now("rpm:other", capacity=60).allowed  # buckets are independent


def test_force_overdraws_and_refunds(table: SharedBuckets, clock: FakeMonotonic) -> None:
    assert table.acquire_now("tpm:k", capacity=100, cost=80).allowed
    assert not table.acquire_now("tpm:k", capacity=100, cost=30).allowed  # does not fit: not taken
    assert table.acquire_now("tpm:k", capacity=100, cost=-50, force=True).remaining == 70  # refund
    assert table.acquire_now("tpm:k", capacity=100, cost=30).allowed
    assert table.acquire_now("tpm:k", capacity=100, cost=500, force=True).remaining == 0  # floor -capacity
    assert not table.acquire_now("tpm:k", capacity=100, cost=0).allowed


def test_attached_handle_sees_the_same_buckets(table: SharedBuckets) -> None:
    other = SharedBuckets.attach(table.name)
    try:
        for _ in range(5):
            assert table.acquire_now("rpm:k", capacity=8).allowed
        assert sum(other.acquire_now("rpm:k", capacity=8).allowed for _ in range(5)) == 3
        assert other.status()["entries"] == 1024 and not other.owner
    finally:
        other.close()
    assert table.acquire_now("rpm:k", capacity=8).allowed is False  # the owner's view is unchanged


def test_counters_seed_charge_and_lift(table: SharedBuckets) -> None:
    def charge(cost: int, *, force: bool = False, seed: int | None = None) -> Outcome:
        return table.apply_now([Op("q", 10, cost, force, counter=True, seed=seed)])

    absent = charge(1)
    assert not absent.ok and absent.unseeded == 0  # the caller seeds from the store and retries
    assert table.counter_get("q") is None
    assert charge(6, seed=4) == Outcome(True, -1, -1, (10.0,))
    assert charge(0, seed=0) == Outcome(False, 0, -1, (10.0,))  # spent: nothing left to check out
    assert charge(-3, force=True).values == (7.0,)
    assert charge(3).ok and not charge(1).ok
    assert table.lift_now("q", 5) == 10  # never lowered
    assert table.lift_now("q", 12) == 12 and table.counter_get("q") == 12


def test_one_request_is_all_or_nothing(table: SharedBuckets) -> None:
    ops = [Op("q:k:d", 100, 0, counter=True, seed=0), Op("tpm:k", 50, 0), Op("rpm:k", 2, 1)]
    assert table.apply_now(ops).ok and table.apply_now(ops).ok
    refused = table.apply_now(ops)
    assert not refused.ok and refused.refused == 2 and refused.values[2] < 1
    big = [Op("tpm:k", 50, 40), Op("q:k:d", 100, 120, counter=True)]
    assert table.apply_now(big).refused == 1
    assert table.acquire_now("tpm:k", capacity=50, cost=0).remaining == 50  # tpm was not taken


def test_names_in_one_stripe_get_their_own_slots(clock: FakeMonotonic) -> None:
    # One stripe of 4 slots: a request's 3 absent names must not share the first empty slot.
    with SharedBuckets.create(entries=4, stripes=1) as t:
        ops = [Op("a", 10, 1), Op("b", 20, 2), Op("c", 30, 3, counter=True, seed=5)]
        assert t.apply_now(ops).values == (9.0, 18.0, 8.0)
        assert t.apply_now([Op("a", 10, 0)]).values == (9.0,)
        assert t.counter_get("c") == 8


def test_a_full_table_replaces_the_least_recently_used(clock: FakeMonotonic) -> None:
    with SharedBuckets.create(entries=64, stripes=4) as t:
        for i in range(1000):
            clock.now += 0.001
            assert t.acquire_now(f"rpm:{i}", capacity=1).allowed
        assert t.evictions > 0
        clock.now += 0.001
        assert not t.acquire_now("rpm:999", capacity=1).allowed  # the newest survived


def test_threads_of_one_process_do_not_lose_updates(table: SharedBuckets) -> None:
    # POSIX locks do not exclude threads of one process; the table's own thread lock must.
    def work() -> None:
        for _ in range(2000):
            table.acquire_now("tpm:t", capacity=10**9, cost=1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    left = table.acquire_now("tpm:t", capacity=10**9, cost=0).remaining
    assert 10**9 - left - 8000 < 10**9 / 60 * 5  # only refill (≤ 5 s of it) explains a difference


def test_attach_unknown_name_and_use_after_close() -> None:
    with pytest.raises(ConfigError, match="no shared limits table"):
        SharedBuckets.attach("gazsi_lim_does_not_exist")
    t = SharedBuckets.create(entries=64, stripes=4)
    name = t.name
    t.close()
    t.close()  # idempotent
    with pytest.raises(ConfigError):
        SharedBuckets.attach(name)  # the owner unlinked it
    with pytest.raises(ConfigError, match="closed"):
        t.acquire_now("x", capacity=1)


def test_an_attached_process_exiting_does_not_unlink_the_table(table: SharedBuckets) -> None:
    # Before Python 3.13 an attaching process's resource tracker unlinks the block at its exit.
    code = ("from gazsi_cluster.auth.shared_limits import SharedBuckets; import sys; "
            "t = SharedBuckets.attach(sys.argv[1]); t.acquire_now('rpm:k', capacity=5); t.close()")
    subprocess.run([sys.executable, "-c", code, table.name], check=True, timeout=30)
    again = SharedBuckets.attach(table.name)
    try:
        assert again.acquire_now("rpm:k", capacity=5).remaining == 3  # saw the other process's request
    finally:
        again.close()
