"""`serve deploy deployments/cpu.yaml` end to end on a loopback-only Ray (issue: Serve deployments)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ._netns import run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_serve_deploy_cpu_profile_reconfigures_and_survives_an_edge_kill(reference_model) -> None:
    r = run_scenario(Path(__file__).with_name("_serve_scenario.py"), timeout_s=880)
    assert r["no_key_status"] == 401
    assert r["statuses"] == [200, 200, 200]
    ref = reference_model.encode(["hello world", "GAZSI serves embeddings at the edge."], normalize_embeddings=True)
    for path, vectors in r["embeddings"].items():
        got = np.asarray(vectors, dtype=np.float32)
        assert float((got * ref).sum(axis=1).min()) >= 0.999, path
    assert r["route"]["url"].startswith("http://127.0.0.1:")
    assert r["edge_replicas"] == 2
    # user_config redeployed under load: applied in place, nothing lost, no replica restarted.
    assert r["reconfigure_load"]["failed"] == 0, r["reconfigure_load"]["errors"]
    assert r["reconfigure_load"]["ok"] > 10
    assert r["replicas_kept"] is True
    assert r["edge_batcher_after"]["max_batch_size"] == 16
    assert r["edge_batcher_after"]["max_wait_us"] == 1000
    load = r["load"]
    assert load["ok"] > 20
    assert load["failed"] == 0, load["errors"]
    # The killed edge left the routing table (heartbeats stopped) within the dead-node window.
    assert load["left_table_after_s"] is not None
    assert load["left_table_after_s"] < 6
