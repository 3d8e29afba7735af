"""``gazsi keys``: create, list, show, revoke, rotate keys and read usage.

Talks to the key store the settings name (``auth.database_url``; unset = SQLite in ``data_dir``)
and publishes revocations on Redis when ``auth.redis_url`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, date, datetime
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys")
    keys.add_argument("--data-dir", help="where the embedded key store lives (env GAZSI_DATA_DIR)")
    keys.add_argument("--json", action="store_true", help="print JSON instead of text")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = ks.add_parser("create", help="create a key (the full key is printed once)")
    create.add_argument("--name", required=True)
    create.add_argument("--owner", default="")
    create.add_argument("--scopes", nargs="+", default=["*"], help="model names, '*' or 'admin'")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--monthly-quota", type=int, help="tokens per calendar month")
    create.add_argument("--expires-days", type=float)
    create.add_argument("--admin", action="store_true", help="add the admin scope")
    create.set_defaults(handler=_run, action="create")

    ks.add_parser("list", help="list keys").set_defaults(handler=_run, action="list")
    for action, text in (("show", "show a key"), ("revoke", "revoke a key everywhere"),
                         ("rotate", "issue a new secret and revoke the old one")):
        p = ks.add_parser(action, help=text)
        p.add_argument("ident", metavar="ID|PREFIX")
        p.set_defaults(handler=_run, action=action)

    usage = ks.add_parser("usage", help="usage per key, model and day")
    usage.add_argument("--key", dest="ident", metavar="ID|PREFIX")
    usage.add_argument("--since", type=date.fromisoformat)
    usage.add_argument("--until", type=date.fromisoformat)
    usage.set_defaults(handler=_run, action="usage")


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _describe(rec: dict[str, Any]) -> str:
    limits = ", ".join(f"{k}={rec[k]}" for k in ("rpm", "tpm", "monthly_quota") if rec[k]) or "none"
    state = "revoked" if rec["revoked_at"] else "active"
    return (f"{rec['id']}  {rec['prefix']}…  {rec['name']}  [{state}]\n"
            f"  owner: {rec['owner'] or '-'}  scopes: {','.join(rec['scopes'])}  limits: {limits}\n"
            f"  created: {_when(rec['created_at'])}  expires: {_when(rec['expires_at'])}  "
            f"revoked: {_when(rec['revoked_at'])}")


def _run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from gazsi_cluster.auth.admin import KeyAdmin
    from gazsi_cluster.auth.factory import build_key_admin_parts
    from gazsi_cluster.config import load_settings

    overrides: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {}
    settings = load_settings(args.config, **overrides)
    store, redis = build_key_admin_parts(settings)
    try:
        await store.start()
    except BaseException:
        if redis is not None:
            await redis.aclose()
        raise
    admin = KeyAdmin(store, env=settings.auth.key_env, redis=redis,
                     redis_ttl_s=settings.auth.redis_cache_ttl_s)
    try:
        out = await _act(admin, args)
    finally:
        await store.close()
        if redis is not None:
            await redis.aclose()
    if args.json:
        print(json.dumps(out, indent=2))
    elif isinstance(out, dict) and "key" in out:
        print(_describe(out))
        print(f"\n  key: {out['key']}\n\nStore it now: it is shown only this once.")
    elif isinstance(out, dict):
        print(_describe(out))
    elif args.action == "usage":
        print(f"{'day':<10}  {'key':<20}  {'model':<24}  {'requests':>10}  {'tokens':>12}")
        for row in out:
            print(f"{row['day']:<10}  {row['key_id']:<20}  {row['model']:<24}  {row['requests']:>10}  "
                  f"{row['tokens']:>12}")
    else:
        for rec in out:
            print(_describe(rec))
    return 0


async def _act(admin: Any, args: argparse.Namespace) -> Any:
    if args.action == "create":
        new = await admin.create(
            name=args.name, owner=args.owner, scopes=args.scopes, rpm=args.rpm, tpm=args.tpm,
            monthly_quota=args.monthly_quota, expires_days=args.expires_days, admin=args.admin,
        )
        return {**new.record.public(), "key": new.key}
    if args.action == "list":
        return [r.public() for r in await admin.list_keys()]
    if args.action == "show":
        return (await admin.get(args.ident)).public()
    if args.action == "revoke":
        return (await admin.revoke(args.ident)).public()
    if args.action == "rotate":
        new = await admin.rotate(args.ident)
        return {**new.record.public(), "key": new.key}
    rows = await admin.usage(ident=args.ident, since=args.since, until=args.until)
    return [r.public() for r in rows]
