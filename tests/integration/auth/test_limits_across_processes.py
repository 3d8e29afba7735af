"""Limits that hold across processes: real OS processes (started with ``subprocess``, not forked
from each other), each building its own ``KeyAuthorizer`` the way every edge process does.

* one node, no Redis: its workers share the node's shared-memory table, so one key gets its
  limit once per node (and, as the control shows, once per process without the table);
* two "edges" × three workers with Redis: requests/min, tokens/min (charged before the work)
  and a daily token budget hold cluster-wide, and usage in the store matches what was served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gazsi_cluster.auth.admin import KeyAdmin
from gazsi_cluster.auth.factory import open_store
from gazsi_cluster.auth.shared_limits import SharedBuckets
from tests.support.auth_hammer import run_hammers

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

SECONDS = 3.0


async def make_key(data_dir: Path, **limits: Any) -> str:
    store = open_store(None, data_dir)
    await store.start()
    try:
        return (await KeyAdmin(store, env="test").create(name="hammered", **limits)).key
    finally:
        await store.close()


async def usage_tokens(data_dir: Path) -> dict[str, tuple[int, int]]:
    store = open_store(None, data_dir)
    await store.start()
    try:
        rows = await store.usage()
    finally:
        await store.close()
    out: dict[str, tuple[int, int]] = {}
    for r in rows:
        req, tok = out.get(r.key_id, (0, 0))
        out[r.key_id] = (req + r.requests, tok + r.tokens)
    return out


def expected(limit: int, seconds: float) -> float:
    """A full bucket plus its refill over the window (limit/60 per second)."""
    return limit + limit / 60.0 * seconds


async def test_node_table_holds_rpm_across_worker_processes(tmp_path: Path) -> None:
    rpm, workers = 600, 4
    key = await make_key(tmp_path, rpm=rpm)
    with SharedBuckets.create(entries=4096) as table:
        results = await run_hammers([
            {"data_dir": str(tmp_path), "key": key, "seconds": SECONDS, "table": table.name}
            for _ in range(workers)
        ])
    allowed = sum(r["ok"] for r in results)
    assert sum(r["limited"] for r in results) > 0, "the processes never hit the limit: the test proves nothing"
    assert all(r["ok"] > 0 for r in results)
    ratio = allowed / expected(rpm, SECONDS)
    print(f"node table, {workers} processes: allowed {allowed} / expected {expected(rpm, SECONDS):.0f} = {ratio:.3f}")
    assert abs(ratio - 1) < 0.05, results


async def test_control_without_the_table_each_process_gets_the_whole_limit(tmp_path: Path) -> None:
    # What issue 18 found on the 4-worker fast front: per-process buckets multiply the limit.
    rpm, workers = 600, 2
    key = await make_key(tmp_path, rpm=rpm)
    results = await run_hammers([
        {"data_dir": str(tmp_path), "key": key, "seconds": SECONDS} for _ in range(workers)
    ])
    allowed = sum(r["ok"] for r in results)
    print(f"control, {workers} processes without the table: allowed {allowed} / {expected(rpm, SECONDS):.0f}")
    assert allowed > 1.8 * expected(rpm, SECONDS)


async def test_two_edges_with_redis_hold_rpm_tpm_and_daily_budget(tmp_path: Path, redis_url: str) -> None:
    edges, workers = 2, 3
    rpm, tpm, budget = 600, 6000, 20_000
    rpm_key = await make_key(tmp_path, rpm=rpm)
    tpm_key = await make_key(tmp_path, tpm=tpm)
    budget_key = await make_key(tmp_path, daily_quota=budget)
    tables = [SharedBuckets.create(entries=4096) for _ in range(edges)]
    try:
        base = {"data_dir": str(tmp_path), "redis_url": redis_url, "seconds": SECONDS}
        # Run 1: every process of both edges on one requests/min key.
        rpm_results = await run_hammers([
            {**base, "key": rpm_key, "table": t.name, "seed": i}
            for t in tables for i in range(workers)
        ])
        # Run 2: tokens/min and the daily budget at once, each key on processes of both edges.
        configs = []
        for e, t in enumerate(tables):
            for i in range(workers):
                key = tpm_key if i % 2 == 0 else budget_key
                configs.append({**base, "key": key, "table": t.name, "tokens": [5, 50],
                                "seed": 10 * e + i})
        token_results = await run_hammers(configs)
    finally:
        for t in tables:
            t.close()

    allowed = sum(r["ok"] for r in rpm_results)
    assert sum(r["limited"] for r in rpm_results) > 0
    rpm_ratio = allowed / expected(rpm, SECONDS)

    tpm_runs = [r for c, r in zip(configs, token_results, strict=True) if c["key"] == tpm_key]
    budget_runs = [r for c, r in zip(configs, token_results, strict=True) if c["key"] == budget_key]
    tpm_tokens = sum(r["tokens"] for r in tpm_runs)
    assert sum(r["limited"] for r in tpm_runs) > 0
    tpm_ratio = tpm_tokens / expected(tpm, SECONDS)
    budget_tokens = sum(r["tokens"] for r in budget_runs)
    assert sum(r["quota_refusals"] for r in budget_runs) > 0
    print(f"2 edges x {workers} workers + Redis: rpm {allowed}/{expected(rpm, SECONDS):.0f} = {rpm_ratio:.3f}; "
          f"tpm {tpm_tokens}/{expected(tpm, SECONDS):.0f} = {tpm_ratio:.3f}; daily budget {budget_tokens}/{budget}")
    assert abs(rpm_ratio - 1) < 0.05, rpm_results
    assert abs(tpm_ratio - 1) < 0.05, tpm_runs
    # Charged before the work: the budget is never overdrawn, and at most one request's worth is left.
    assert budget - 50 <= budget_tokens <= budget, budget_runs

    # Usage in the store is exactly what the processes were allowed (they flushed on exit).
    served = [(allowed, 0), (sum(r["ok"] for r in tpm_runs), tpm_tokens),
              (sum(r["ok"] for r in budget_runs), budget_tokens)]
    assert sorted(served) == sorted((await usage_tokens(tmp_path)).values())
