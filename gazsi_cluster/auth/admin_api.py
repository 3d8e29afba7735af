"""``/admin/keys`` and ``/admin/usage``: key lifecycle over HTTP, admin-scope key required.

Responses carry key records without hashes; the full key appears once, in the create/rotate answer.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from pydantic import BaseModel, ConfigDict, Field

from gazsi_cluster.auth.authorizer import KeyAuthorizer
from gazsi_cluster.auth.keys import NewKey, parse_duration

__all__ = ["CreateKeyRequest", "UpdateKeyRequest", "build_admin_router"]

# Module level: FastAPI resolves the (string) annotations of the route functions in this namespace.
AuthHeader = Annotated[str | None, Header()]


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Human name of the key.")
    owner: str = Field("", max_length=200, description="Who the key belongs to.")
    scopes: list[str] = Field(default_factory=lambda: ["*"], description="Model names, '*' or 'admin'.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute.")
    monthly_quota: int | None = Field(None, ge=1, description="Tokens per calendar month (UTC).")
    daily_quota: int | None = Field(None, ge=1, description="Tokens per UTC day.")
    expires_days: float | None = Field(None, gt=0, description="Days until the key expires.")
    expires_in: str | None = Field(None, description="Time until the key expires: 30d, 12h, 90m, 2w.")
    admin: bool = Field(False, description="Add the admin scope.")


class UpdateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=200, description="New name.")
    owner: str | None = Field(None, max_length=200, description="New owner.")
    scopes: list[str] | None = Field(None, description="Models the key may use ('*' = all).")
    rpm: int | None = Field(None, ge=0, description="Requests per minute (0 removes the limit).")
    tpm: int | None = Field(None, ge=0, description="Tokens per minute (0 removes the limit).")
    monthly_quota: int | None = Field(None, ge=0, description="Tokens per month (0 removes the budget).")
    daily_quota: int | None = Field(None, ge=0, description="Tokens per UTC day (0 removes the budget).")
    expires_in: str | None = Field(None, description="New expiry from now: 30d, 12h; 'never' removes it.")
    admin: bool | None = Field(None, description="Add (true) or remove (false) the admin scope.")


def _created(new: NewKey) -> dict[str, Any]:
    return {**new.record.public(), "key": new.key}


def build_admin_router(authorizer: object) -> APIRouter | None:
    """The admin routes for a :class:`KeyAuthorizer`; ``None`` for others (no key store, no admin API)."""
    if not isinstance(authorizer, KeyAuthorizer):
        return None
    auth = authorizer
    admin = auth.admin
    router = APIRouter(prefix="/admin", tags=["admin"])

    async def require_admin(authorization: str | None) -> None:
        await auth.authorize(authorization, admin=True)

    @router.post("/keys", status_code=201, summary="Create a key (the full key is returned only here)")
    async def create_key(body: CreateKeyRequest, authorization: AuthHeader = None) -> dict[str, Any]:
        await require_admin(authorization)
        new = await admin.create(
            name=body.name, owner=body.owner, scopes=body.scopes, rpm=body.rpm, tpm=body.tpm,
            monthly_quota=body.monthly_quota, daily_quota=body.daily_quota, expires_days=body.expires_days,
            expires_in_s=parse_duration(body.expires_in) if body.expires_in else None, admin=body.admin,
        )
        return _created(new)

    @router.patch("/keys/{ident}", summary="Change a key's limits, budgets, models or expiry (same secret)")
    async def update_key(ident: str, body: UpdateKeyRequest, authorization: AuthHeader = None) -> dict[str, Any]:
        await require_admin(authorization)
        never = body.expires_in is not None and body.expires_in.strip().lower() == "never"
        updated = await admin.update(
            ident, name=body.name, owner=body.owner, scopes=body.scopes, rpm=body.rpm, tpm=body.tpm,
            monthly_quota=body.monthly_quota, daily_quota=body.daily_quota, admin=body.admin,
            expires_in_s=parse_duration(body.expires_in) if body.expires_in and not never else None,
            clear_expiry=never,
        )
        return updated.public()

    @router.get("/keys", summary="List keys")
    async def list_keys(authorization: AuthHeader = None) -> dict[str, Any]:
        await require_admin(authorization)
        return {"object": "list", "data": [r.public() for r in await admin.list_keys()]}

    @router.get("/keys/{ident}", summary="Show a key by id or display prefix")
    async def get_key(ident: str, authorization: AuthHeader = None) -> dict[str, Any]:
        await require_admin(authorization)
        return (await admin.get(ident)).public()

    @router.post("/keys/{ident}/revoke", summary="Revoke a key everywhere")
    async def revoke_key(ident: str, authorization: AuthHeader = None) -> dict[str, Any]:
        await require_admin(authorization)
        return (await admin.revoke(ident)).public()

    @router.delete("/keys/{ident}", summary="Revoke a key everywhere (same as POST …/revoke)")
    async def delete_key(ident: str, authorization: AuthHeader = None) -> dict[str, Any]:
        await require_admin(authorization)
        return (await admin.revoke(ident)).public()

    @router.post("/keys/{ident}/rotate", summary="New secret for the same key (usage and limits carry over)")
    async def rotate_key(ident: str, authorization: AuthHeader = None) -> dict[str, Any]:
        await require_admin(authorization)
        return _created(await admin.rotate(ident))

    @router.get("/usage", summary="Usage per key, model and day")
    async def usage(
        authorization: AuthHeader = None,
        key: Annotated[str | None, Query(description="Key id or display prefix")] = None,
        since: Annotated[date | None, Query()] = None,
        until: Annotated[date | None, Query()] = None,
    ) -> dict[str, Any]:
        await require_admin(authorization)
        # Include what this process has buffered but not yet written.
        await auth.usage.flush()
        rows = await admin.usage(ident=key, since=since, until=until)
        return {"object": "list", "data": [r.public() for r in rows]}

    return router
