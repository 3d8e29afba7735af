"""Ray for tests without the user's ``~/.ray``: an empty HOME per run, a token per cluster.

Ray's default token file is ``~/.ray/auth_token``; ``ray.init(address="local")`` writes it there
and ``ray start --head`` in token mode reads it. A test that leaned on a token left there by an
earlier test once hid that ``gazsi up`` could not start on a fresh machine; so every test that
starts Ray gets a HOME of its own (``fresh_home_env``), and a test that runs its own cluster the
way a user with token auth would gives it a token file of its own (``use_token_auth``).
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

__all__ = ["fresh_home_env", "require_own_home", "use_token_auth"]


def fresh_home_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's env) with HOME an empty directory and the XDG dirs under it
    (``GAZSI_TEST_OWN_HOME=1`` tells a pytest run there that this HOME is the test's, not the user's)."""
    home = Path(tempfile.mkdtemp(prefix="gazsi-home-"))
    env = dict(os.environ if base is None else base)
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local/share"), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"), XDG_STATE_HOME=str(home / ".local/state"),
               RAY_USAGE_STATS_ENABLED="0", GAZSI_TEST_OWN_HOME="1")
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(name, None)
    return env


def require_own_home() -> None:
    """Refuse to go on in the user's HOME: code that starts or joins Ray calls this first.

    A process started with :func:`fresh_home_env` carries ``GAZSI_TEST_OWN_HOME=1``; anything else
    (a scenario script run by hand, an inner test selected without its wrapper) stops here instead of
    writing a token into the user's ``~/.ray``.
    """
    if os.environ.get("GAZSI_TEST_OWN_HOME") != "1":
        raise RuntimeError("this runs Ray and needs a HOME of its own: start it through its test "
                           "(tests/support/ray_env.py fresh_home_env), not in the user's HOME")


def use_token_auth(directory: Path) -> dict[str, str]:
    """Turn on Ray token auth for this process and its children with a new token in `directory`
    (what the README tells a user of a token-auth cluster to set); returns the env to pass on."""
    directory.mkdir(parents=True, exist_ok=True)
    token = directory / "ray_auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    return dict(os.environ)
