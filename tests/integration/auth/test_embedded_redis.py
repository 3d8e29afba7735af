"""The Redis ``gazsi up`` brings along: started and stopped with the cluster, loopback only, no
persistence, reused when running, and what every process of the cluster is pointed at."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gazsi_cli import embedded_redis
from gazsi_cluster.config import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    try:
        yield tmp_path
    finally:
        embedded_redis.stop(tmp_path)


def test_start_reuse_and_stop(data_dir: Path) -> None:
    url = embedded_redis.start(data_dir)
    assert url.startswith("unix://") and url.endswith("/redis/redis.sock?db=0")
    sock = data_dir / "redis" / "redis.sock"
    assert oct(sock.stat().st_mode & 0o777) == "0o700"  # only this user may connect
    client = redis.Redis.from_url(url)
    try:
        assert client.ping()
        config = client.config_get("*")
        assert config["save"] == "" and config["appendonly"] == "no"  # nothing written behind the user's back
        assert config["port"] == "0"  # no TCP listener at all
        assert config["maxmemory-policy"] == "volatile-lru" and int(config["maxmemory"]) > 0
    finally:
        client.close()
    assert embedded_redis.start(data_dir) == url  # a second `gazsi up` reuses it
    assert embedded_redis.running_url(data_dir) == url
    pid = int(json.loads((data_dir / "redis" / "state.json").read_text())["pid"])
    assert embedded_redis.stop(data_dir) is True
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert embedded_redis.running_url(data_dir) is None and not sock.exists()
    assert embedded_redis.stop(data_dir) is False


def test_a_path_too_long_for_a_socket_uses_loopback_tcp_with_a_password(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    try:
        url = embedded_redis.start(deep)
        assert url.startswith("redis://:") and "@127.0.0.1:" in url
        assert redis.Redis.from_url(url).ping()
        anonymous = redis.Redis(host="127.0.0.1", port=int(url.rsplit(":", 1)[1].split("/")[0]))
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        assert oct((deep / "redis" / "state.json").stat().st_mode & 0o777) == "0o600"  # it holds the password
        pid = int(json.loads((deep / "redis" / "state.json").read_text())["pid"])
        assert embedded_redis.stop(deep) is True
        with pytest.raises(ProcessLookupError):  # redis-server renames itself: stop must not rely on that
            os.kill(pid, 0)
    finally:
        embedded_redis.stop(deep)


def test_a_reused_pid_is_never_signalled(data_dir: Path) -> None:
    embedded_redis.start(data_dir)
    state_path = data_dir / "redis" / "state.json"
    state = json.loads(state_path.read_text())
    real = dict(state)
    state["pid"] = os.getpid()  # as if our redis had died and this pid now belonged to someone else
    state_path.write_text(json.dumps(state))
    assert embedded_redis.running_url(data_dir) is None
    assert embedded_redis.stop(data_dir) is False  # and this test process is still alive
    state_path.write_text(json.dumps(real))


def test_up_env_points_the_cluster_at_it_unless_the_user_configured_redis(data_dir: Path) -> None:
    said: list[str] = []
    settings = load_settings(data_dir=str(data_dir))
    env = embedded_redis.up_env(settings, local_cluster=True, say=said.append)
    assert env == {"GAZSI_AUTH__REDIS_URL": embedded_redis.running_url(data_dir)}
    theirs = load_settings(data_dir=str(data_dir), auth={"redis_url": "redis://redis.internal:6379/0"})
    assert embedded_redis.up_env(theirs, local_cluster=True, say=said.append) == {}
    assert embedded_redis.up_env(settings, local_cluster=False, say=said.append) == {}
    assert "per node" in said[-1]


async def test_authorizers_on_the_embedded_redis_share_limits_and_revocations(data_dir: Path) -> None:
    from gazsi_cluster.auth.factory import build_authorizer
    from gazsi_cluster.errors import AuthenticationError, RateLimited

    url = embedded_redis.start(data_dir)
    settings = load_settings(data_dir=str(data_dir), auth={"redis_url": url, "key_env": "test"})
    a, b = build_authorizer(settings), build_authorizer(settings)
    for auth in (a, b):
        await auth.start()
    try:
        new = await a.admin.create(name="shared", rpm=4)
        for auth in (a, b, a, b):
            await auth.authorize(f"Bearer {new.key}")
        with pytest.raises(RateLimited):
            await b.authorize(f"Bearer {new.key}")
        assert a.status()["limits_scope"] == "cluster"
        await b.subscribed.wait()
        await a.admin.revoke(new.record.id)
        for _ in range(200):
            try:
                await b.authorize(f"Bearer {new.key}")
            except AuthenticationError:
                break
            except RateLimited:
                pass
            await asyncio.sleep(0.005)
        else:
            pytest.fail("the revocation did not reach the other authorizer")
    finally:
        for auth in (a, b):
            await auth.close()
