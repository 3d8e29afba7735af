"""Bearer-key authentication: the seam the data planes call.

``Authorizer.authorize`` takes the raw ``Authorization`` header and what the request wants
(a model, or admin rights) and returns the caller's :class:`Principal` or raises
``AuthenticationError`` (401) / ``PermissionDenied`` (403) / ``RateLimited`` (429).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["AllowAll", "Authorizer", "Principal"]


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str = ""
    scopes: frozenset[str] = field(default_factory=frozenset)
    # X-RateLimit-* headers for the response (name, value) pairs; empty when the key has no limits.
    headers: tuple[tuple[str, str], ...] = ()


class Authorizer(Protocol):
    async def authorize(self, authorization: str | None, *, model: str | None = None, admin: bool = False) -> Principal:
        ...

    async def reserve_tokens(self, principal: Principal, *, model: str, tokens: int) -> None:
        """Charge ``tokens`` to the key's token limits before the work runs (the input size is known);
        raises ``RateLimited`` / ``QuotaExceeded`` when they do not fit."""
        ...

    async def record_usage(
        self, principal: Principal, *, model: str, tokens: int, reserved: int = 0, cached_tokens: int = 0,
        requests: int = 1,
    ) -> None:
        """Record ``tokens`` served (billed: computed by the engine); ``reserved`` is what
        :meth:`reserve_tokens` already charged (the difference is settled); ``cached_tokens`` were
        served from the response cache (counted, not billed). ``requests=0, tokens=0`` gives a
        failed request's reservation back without counting it."""
        ...


class AllowAll:
    """No authentication (``auth.enabled: false``); every caller is ``anonymous``."""

    _anonymous = Principal("anonymous", "anonymous", frozenset({"*"}))

    async def authorize(self, authorization: str | None, *, model: str | None = None, admin: bool = False) -> Principal:
        return self._anonymous

    async def reserve_tokens(self, principal: Principal, *, model: str, tokens: int) -> None:
        return None

    async def record_usage(
        self, principal: Principal, *, model: str, tokens: int, reserved: int = 0, cached_tokens: int = 0,
        requests: int = 1,
    ) -> None:
        return None
