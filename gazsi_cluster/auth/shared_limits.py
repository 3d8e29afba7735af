"""Per-node limits without Redis: token buckets and quota counters in one shared-memory table that
every process of a node (the node process and its HTTP workers) reads and writes.

The table is a fixed array of entries ``(key hash: u64, value: f64, timestamp: f64)``, found by
open addressing on a 64-bit BLAKE2b hash of the bucket name. It is split into stripes; an entry
lives (and is probed for) only inside the stripe its hash picks, and each stripe is guarded by
a POSIX byte-range lock (``fcntl.lockf``) on the shared block's own file descriptor. Those locks
work between processes that share nothing but the block's name (workers started with
``subprocess``/spawn inherit no ``multiprocessing.Lock``), and the kernel drops them when a
process dies, so a worker killed mid-update cannot wedge the node. POSIX locks belong to the
process, not the thread, so a per-process ``threading.Lock`` serialises threads first.

Timestamps are ``time.monotonic()``: CLOCK_MONOTONIC is one clock for every process of a host.

>>> buckets = SharedBuckets.create(entries=65_536)           # the node process   # doctest: +SKIP
>>> worker = SharedBuckets.attach(buckets.name)               # each worker        # doctest: +SKIP
>>> await worker.apply([Op("rpm:key_1", 60, cost=1)])          # doctest: +SKIP
"""

from __future__ import annotations

import fcntl
import hashlib
import secrets
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from multiprocessing import shared_memory
from typing import Any

from gazsi_cluster.auth.limits import Decision, Op, Outcome, bucket_step, counter_step, decide, outcome_of
from gazsi_cluster.errors import ConfigError

__all__ = ["SharedBuckets"]

_MAGIC = b"GZSLIM01"
_HEADER = struct.Struct("<8sII")  # magic, entries, stripes
_HEADER_BYTES = 64
_ENTRY = struct.Struct("<Qdd")  # key hash (0 = empty), value, last touched (monotonic s)
_PROBES = 16  # slots looked at from an entry's home slot before the oldest of them is replaced


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Attach without registering with a resource tracker (what 3.13's ``track=False`` does).

    Before 3.13 attaching registers the block with this process's tracker, which unlinks it when
    the process exits, under the owner's feet. Unregistering afterwards is no cure: a process
    sharing the owner's tracker (the owner itself, a spawn child) would remove the owner's entry.
    Attaching happens once, at start-up, before any other thread could register anything.
    """
    from multiprocessing import resource_tracker

    register = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


def _hash64(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") or 1


class SharedBuckets:
    """A :class:`~gazsi_cluster.auth.limits.RateLimiter` (and quota counters) shared by the
    processes of one node. Build with :meth:`create` (owner) or :meth:`attach` (by name)."""

    scope = "node"

    def __init__(self, shm: shared_memory.SharedMemory, *, owner: bool) -> None:
        buf: Any = shm.buf
        magic, entries, stripes = _HEADER.unpack_from(buf, 0)
        if magic != _MAGIC or entries <= 0 or stripes <= 0 or entries % stripes:
            shm.close()
            raise ConfigError(f"shared memory {shm.name!r} is not a GAZSI limits table")
        self._shm, self.owner = shm, owner
        self._buf: Any = buf
        self._fd: int = shm._fd  # type: ignore[attr-defined]  # the block's fd: what lockf locks
        self.entries, self.stripes = entries, stripes
        self._per_stripe = entries // stripes
        self._probes = min(_PROBES, self._per_stripe)
        self._thread_lock = threading.Lock()
        self._hashes: dict[str, int] = {}
        self.evictions = 0

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, *, entries: int = 65_536, stripes: int = 64, name: str | None = None) -> SharedBuckets:
        """A new, empty table owned by the caller (who must :meth:`close` it: that unlinks it)."""
        if entries < stripes or entries % stripes:
            raise ConfigError(f"entries ({entries}) must be a positive multiple of stripes ({stripes})")
        shm = shared_memory.SharedMemory(
            name=name or f"gazsi_lim_{secrets.token_hex(6)}", create=True,
            size=_HEADER_BYTES + entries * _ENTRY.size,
        )
        # A fresh block is zero-filled: every entry starts empty.
        buf: Any = shm.buf
        _HEADER.pack_into(buf, 0, _MAGIC, entries, stripes)
        return cls(shm, owner=True)

    @classmethod
    def attach(cls, name: str) -> SharedBuckets:
        """The table :meth:`create` made under ``name``, from any process of the same host."""
        try:
            if sys.version_info >= (3, 13):
                shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg,unused-ignore]
            else:
                shm = _attach_untracked(name)
        except FileNotFoundError as exc:
            raise ConfigError(f"no shared limits table named {name!r} (has the node process started?)") from exc
        return cls(shm, owner=False)

    @property
    def name(self) -> str:
        return str(self._shm.name)

    def close(self) -> None:
        """Detach; the owner also unlinks the block (attached processes keep their mapping)."""
        if self._buf is None:
            return
        self._buf = None
        self._shm.close()
        if self.owner:
            with suppress(FileNotFoundError):
                self._shm.unlink()

    def __enter__(self) -> SharedBuckets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the table -------------------------------------------------------------------------
    def _key(self, name: str) -> int:
        h = self._hashes.get(name)
        if h is None:
            if len(self._hashes) > 100_000:
                self._hashes.clear()
            h = self._hashes[name] = _hash64(name)
        return h

    @contextmanager
    def _locked(self, stripes: Sequence[int]) -> Iterator[None]:
        """Hold ``stripes`` (sorted, distinct: every process locks in the same order, so two
        requests on overlapping stripes cannot deadlock)."""
        if self._buf is None:
            raise ConfigError("the shared limits table is closed")
        with self._thread_lock:
            held: list[int] = []
            try:
                for stripe in stripes:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, stripe)
                    held.append(stripe)
                yield
            finally:
                for stripe in reversed(held):
                    fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, stripe)

    def _slot(self, h: int, *, create: bool, claimed: frozenset[int] | set[int] = frozenset()) -> tuple[int, bool]:
        """(byte offset of ``h``'s entry, whether it already held ``h``); caller holds its stripe.

        Probing stays inside the stripe and stops at the first empty slot: entries are only ever
        overwritten, never emptied, so ``h`` cannot sit beyond one. A full window replaces its
        least recently touched entry (an idle bucket is a full one anyway, so that loses nothing
        a minute later; an idle counter is read again from the key store). ``claimed``: slots
        already chosen for other names of the same request, not yet written (skipped).
        """
        buf, per = self._buf, self._per_stripe
        base, home = (h % self.stripes) * per, (h // self.stripes) % per
        oldest_off, oldest_ts = -1, float("inf")
        for i in range(self._probes):
            off = _HEADER_BYTES + (base + (home + i) % per) * _ENTRY.size
            key, _value, ts = _ENTRY.unpack_from(buf, off)
            if key == h:
                return off, True
            if off in claimed:
                continue
            if key == 0:
                return off, False
            if ts < oldest_ts:
                oldest_off, oldest_ts = off, ts
        if create:
            self.evictions += 1
        return oldest_off, False

    # -- RateLimiter -----------------------------------------------------------------------
    def apply_now(self, ops: Sequence[Op]) -> Outcome:
        """Apply every op or none, holding the stripes of all of them (see limits.Op)."""
        hashes = [self._key(op.name) for op in ops]
        with self._locked(sorted({h % self.stripes for h in hashes})):
            now = time.monotonic()
            buf = self._buf
            slots: list[tuple[int, bool]] = []
            steps: list[tuple[bool, float, float] | None] = []
            claimed: set[int] = set()
            for op, h in zip(ops, hashes, strict=True):
                off, found = self._slot(h, create=True, claimed=claimed)
                if off < 0:
                    raise ConfigError("shared limits table: every slot of a probe window is taken by one "
                                      "request (raise auth.node_limit_entries)")
                claimed.add(off)
                slots.append((off, found))
                if op.counter:
                    used = _ENTRY.unpack_from(buf, off)[1] if found else op.seed
                    if used is None:
                        steps.append(None)
                        continue
                    allowed, after = counter_step(used, limit=op.limit, cost=op.cost, force=op.force)
                    steps.append((allowed, used, after))
                else:
                    _k, tokens, ts = _ENTRY.unpack_from(buf, off) if found else (h, float(op.limit), now)
                    steps.append(bucket_step(tokens, ts, now, capacity=op.limit, cost=op.cost, force=op.force))
            out = outcome_of(ops, steps)
            if out.ok:
                for h, (off, _found), value in zip(hashes, slots, out.values, strict=True):
                    _ENTRY.pack_into(buf, off, h, value, now)
        return out

    async def apply(self, ops: Sequence[Op]) -> Outcome:
        # Microseconds under locks no process holds for longer: not worth a thread hop.
        return self.apply_now(ops)

    def acquire_now(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        out = self.apply_now([Op(bucket, capacity, cost, force)])
        return decide(out.ok, out.values[0], capacity, cost)

    async def acquire(self, bucket: str, *, capacity: int, cost: int = 1, force: bool = False) -> Decision:
        return self.acquire_now(bucket, capacity=capacity, cost=cost, force=force)

    # -- counters (budgets) ----------------------------------------------------------------
    def lift_now(self, name: str, value: int) -> int:
        """Raise a counter to at least ``value`` (create it if absent); returns its value."""
        h = self._key(name)
        with self._locked([h % self.stripes]):
            off, found = self._slot(h, create=True)
            current = _ENTRY.unpack_from(self._buf, off)[1] if found else None
            current = float(value) if current is None else max(current, float(value))
            _ENTRY.pack_into(self._buf, off, h, current, time.monotonic())
        return int(current)

    async def lift(self, name: str, value: int, *, ttl_s: int = 86_400) -> None:
        self.lift_now(name, value)

    def counter_get(self, name: str) -> int | None:
        h = self._key(name)
        with self._locked([h % self.stripes]):
            off, found = self._slot(h, create=False)
            return int(_ENTRY.unpack_from(self._buf, off)[1]) if found else None

    def status(self) -> dict[str, Any]:
        return {"name": self.name, "entries": self.entries, "evictions": self.evictions}
