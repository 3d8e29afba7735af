"""The edge's tunnel dialer: full-jitter backoff that grows with failures and is capped, a floor that makes a
tight reconnect loop impossible, and host:port parsing."""

from __future__ import annotations

import random
import ssl

import pytest

from edge_node.tunnel import TunnelDialer, split_host_port
from gazsi_cluster.config import TunnelConfig

pytestmark = pytest.mark.unit


def test_backoff_is_jittered_grows_and_is_capped() -> None:
    random.seed(7)
    dialer = TunnelDialer(TunnelConfig(url="gw:1", backoff_min_s=0.2, backoff_max_s=10.0), "http://127.0.0.1:1",
                          context=ssl.create_default_context)
    by_failures = {}
    for failures in (0, 3, 10, 30):
        dialer.failures = failures
        by_failures[failures] = [dialer._backoff() for _ in range(2000)]
    for delays in by_failures.values():
        assert min(delays) >= 0.1  # the floor: half the first delay, never a tight loop
        assert len({round(d, 3) for d in delays}) > 100  # jittered: a restarted gateway is not met all at once
    assert max(by_failures[0]) <= 0.2 and max(by_failures[3]) <= 1.6
    assert max(by_failures[30]) <= 10.0 and sum(by_failures[30]) / 2000 > 4.0  # capped, and near cap/2 on average


def test_split_host_port() -> None:
    assert split_host_port("10.77.0.1:8444") == ("10.77.0.1", 8444)
    assert split_host_port("tunnel://gw.example.com:443/") == ("gw.example.com", 443)
    assert split_host_port("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ValueError):
        split_host_port("gw.example.com")
