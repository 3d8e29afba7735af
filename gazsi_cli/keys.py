"""``gazsi keys``: create, list, show, update, revoke, rotate keys and read usage.

Talks to the key store the settings name (``auth.database_url``; unset = SQLite in ``data_dir``).
Every change lands in the store's change feed, which running processes poll (≤ ``auth.key_events_poll_s``);
with Redis (``auth.redis_url``, or the embedded one ``gazsi up`` started) it is also published,
and processes apply it within milliseconds. ``usage`` reads through the usage journals of
running processes on this machine, so it matches what was served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import date
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
    create.add_argument("--models", "--scopes", dest="scopes", nargs="+", default=["*"],
                        help="models the key may use ('*' = all); 'admin' adds the admin scope")
    _limit_args(create, minimum=1)
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in", metavar="DURATION", help="e.g. 30d, 12h, 90m, 2w")
    expiry.add_argument("--expires-days", type=float, help=argparse.SUPPRESS)
    create.add_argument("--admin", action="store_true", help="add the admin scope")
    create.set_defaults(handler=_run, action="create")

    update = ks.add_parser("update", help="change a key's limits, budgets, models or expiry (same secret)")
    update.add_argument("ident", metavar="ID|PREFIX")
    update.add_argument("--name")
    update.add_argument("--owner")
    update.add_argument("--models", "--scopes", dest="scopes", nargs="+", help="models the key may use")
    _limit_args(update, minimum=0)
    update.add_argument("--expires-in", metavar="DURATION", help="new expiry from now (e.g. 30d), or 'never'")
    update.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                        help="add or (--no-admin) remove the admin scope")
    update.set_defaults(handler=_run, action="update")

    ks.add_parser("list", help="list keys").set_defaults(handler=_run, action="list")
    for action, text in (("show", "show a key"), ("revoke", "revoke a key everywhere"),
                         ("rotate", "issue a new secret for a key (same id, usage and limits)")):
        p = ks.add_parser(action, help=text)
        p.add_argument("ident", metavar="ID|PREFIX")
        p.set_defaults(handler=_run, action=action)

    usage = ks.add_parser("usage", help="usage per key, model and day")
    usage.add_argument("--key", dest="ident", metavar="ID|PREFIX")
    usage.add_argument("--since", type=date.fromisoformat)
    usage.add_argument("--until", type=date.fromisoformat)
    usage.set_defaults(handler=_run, action="usage")


def _limit_args(p: argparse.ArgumentParser, *, minimum: int) -> None:
    off = " (0 removes it)" if minimum == 0 else ""
    p.add_argument("--rpm", type=int, help=f"requests per minute{off}")
    p.add_argument("--tpm", type=int, help=f"tokens per minute{off}")
    p.add_argument("--daily-quota", type=int, help=f"token budget per UTC day{off}")
    p.add_argument("--monthly-quota", type=int, help=f"token budget per calendar month{off}")


def _describe(rec: dict[str, Any]) -> str:
    from gazsi_cluster.auth.keys import format_utc

    def when(epoch: float | None) -> str:
        return "-" if epoch is None else format_utc(epoch)

    limits = ", ".join(f"{k}={rec[k]}" for k in ("rpm", "tpm", "daily_quota", "monthly_quota") if rec.get(k))
    if rec["revoked_at"]:
        state = "revoked"
    elif rec["expires_at"] and rec["expires_at"] <= time.time():
        state = "expired"
    else:
        state = "active"
    return (f"{rec['id']}  {rec['prefix']}…  {rec['name']}  [{state}]\n"
            f"  owner: {rec['owner'] or '-'}  models/scopes: {','.join(rec['scopes'])}  limits: {limits or 'none'}\n"
            f"  created: {when(rec['created_at'])}  expires: {when(rec['expires_at'])}  "
            f"revoked: {when(rec['revoked_at'])}")


def _run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    from gazsi_cli import embedded_redis
    from gazsi_cluster.auth._redis import connect_redis
    from gazsi_cluster.auth.admin import KeyAdmin
    from gazsi_cluster.auth.factory import build_key_admin_parts, journal_dir
    from gazsi_cluster.config import load_settings

    overrides: dict[str, Any] = {"data_dir": args.data_dir} if args.data_dir else {}
    settings = load_settings(args.config, **overrides)
    store, redis = build_key_admin_parts(settings)
    if redis is None:
        # The Redis `gazsi up` started: publishing there applies a change everywhere at once.
        url = embedded_redis.running_url(settings.data_dir)
        if url is not None:
            redis = connect_redis(url, timeout_s=settings.auth.redis_timeout_s)
    try:
        await store.start()
    except BaseException:
        if redis is not None:
            await redis.aclose()
        raise
    admin = KeyAdmin(store, env=settings.auth.key_env, redis=redis,
                     redis_ttl_s=settings.auth.redis_cache_ttl_s, journal_dir=journal_dir(settings))
    try:
        out = await _act(admin, args)
    finally:
        await store.close()
        if redis is not None:
            await redis.aclose()
    _print(args, out)
    if args.action in ("revoke", "rotate", "update") and not args.json:
        print(_reach(settings, published=redis is not None))
    return 0


def _reach(settings: Any, *, published: bool) -> str:
    """When running processes see the change: say it, so nobody trusts `[revoked]` too early."""
    auth = settings.auth
    if published:
        return "Published to the cluster's Redis: running edges and gateways apply it within milliseconds."
    if auth.key_events_poll_s > 0:
        return (f"No Redis here: running edges and gateways see it at their next key-store poll "
                f"(every {auth.key_events_poll_s:g}s, auth.key_events_poll_s).")
    return (f"No Redis and key-store polling is off (auth.key_events_poll_s=0): running processes keep "
            f"trusting their cached copy for up to {auth.cache_ttl_s:g}s (auth.cache_ttl_s).")


def _print(args: argparse.Namespace, out: Any) -> None:
    if args.json:
        print(json.dumps(out, indent=2))
    elif isinstance(out, dict) and "key" in out:
        print(_describe(out))
        print(f"\n  key: {out['key']}\n\nStore it now: it is shown only this once.")
    elif isinstance(out, dict):
        print(_describe(out))
    elif args.action == "usage":
        print(f"{'day':<10}  {'key':<20}  {'model':<24}  {'requests':>10}  {'tokens':>12}  {'cached':>10}")
        for row in out:
            print(f"{row['day']:<10}  {row['key_id']:<20}  {row['model']:<24}  {row['requests']:>10}  "
                  f"{row['tokens']:>12}  {row['cached_tokens']:>10}")
    else:
        for rec in out:
            print(_describe(rec))


async def _act(admin: Any, args: argparse.Namespace) -> Any:
    from gazsi_cluster.auth.keys import parse_duration

    if args.action == "create":
        new = await admin.create(
            name=args.name, owner=args.owner, scopes=args.scopes, rpm=args.rpm, tpm=args.tpm,
            monthly_quota=args.monthly_quota, daily_quota=args.daily_quota, expires_days=args.expires_days,
            expires_in_s=parse_duration(args.expires_in) if args.expires_in else None, admin=args.admin,
        )
        return {**new.record.public(), "key": new.key}
    if args.action == "update":
        never = args.expires_in is not None and args.expires_in.strip().lower() == "never"
        updated = await admin.update(
            args.ident, name=args.name, owner=args.owner, scopes=args.scopes, rpm=args.rpm, tpm=args.tpm,
            monthly_quota=args.monthly_quota, daily_quota=args.daily_quota, admin=args.admin,
            expires_in_s=parse_duration(args.expires_in) if args.expires_in and not never else None,
            clear_expiry=never,
        )
        return updated.public()
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
