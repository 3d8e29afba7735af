"""A per-process, append-only journal of served usage, so that usage a process answered survives
a database outage and a ``kill -9``.

Every ``record_usage`` appends one line to the process's active segment file with a single
``write(2)`` before the reply leaves: once written it is in the kernel's page cache and survives
the process (``fsync`` adds power-loss durability; segments are fsync'd in batches while the
database refuses them). Each flush seals the active segment and offers every sealed one to the
store, which adds a segment's rows and advances its writer's mark in one transaction
(:meth:`~gazsi_cluster.auth.store.KeyStore.apply_journal`), so a segment is counted exactly once
however often it is offered; applied files are then deleted.

A writer holds an ``flock`` on ``<writer>.lock`` for its whole life. The kernel releases it when
the process dies, which is how other processes tell an orphaned journal (replay it) from a live
one (leave it): no pid files, no pid reuse.

Layout: ``<directory>/<writer>.lock`` and ``<directory>/<writer>.<seq>.jsonl``; a line is the JSON
list ``[key_id, model, "YYYY-MM-DD", requests, tokens, cached_tokens]``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import orjson

from gazsi_cluster.auth.keys import UsageRow
from gazsi_cluster.auth.store import JournalSegment

__all__ = ["Orphan", "UsageJournal", "read_journals", "read_segment"]

log = logging.getLogger(__name__)
_SUFFIX = ".jsonl"


def _segment_name(writer: str, seq: int) -> str:
    return f"{writer}.{seq:08d}{_SUFFIX}"


def _parse_name(name: str) -> tuple[str, int] | None:
    if not name.endswith(_SUFFIX):
        return None
    writer, _, seq = name[: -len(_SUFFIX)].rpartition(".")
    return (writer, int(seq)) if writer and seq.isdigit() else None


def read_segment(path: Path) -> tuple[UsageRow, ...]:
    """The rows of one segment file; a last line without its newline (a write cut short) is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ()
    acc: dict[tuple[str, str, str], list[int]] = {}
    for line in data.split(b"\n")[:-1]:
        try:
            key_id, model, day, requests, tokens, cached = orjson.loads(line)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            log.warning("skipping a malformed usage journal line in %s", path.name)
            continue
        slot = acc.setdefault((key_id, model, day), [0, 0, 0])
        slot[0] += requests
        slot[1] += tokens
        slot[2] += cached
    return tuple(UsageRow(k, m, date.fromisoformat(d), v[0], v[1], v[2]) for (k, m, d), v in acc.items())


def read_journals(directory: Path) -> list[JournalSegment]:
    """Every segment in ``directory``, live writers' active ones included (for read-through usage)."""
    out: list[JournalSegment] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            parsed = _parse_name(entry.name)
            if parsed is not None:
                out.append(JournalSegment(parsed[0], parsed[1], read_segment(Path(entry.path))))
    return out


@dataclass
class Orphan:
    """A dead writer's journal, locked by us until :meth:`UsageJournal.release` or ``remove``."""

    writer: str
    lock_fd: int
    lock_path: Path
    segments: list[Path] = field(default_factory=list)


@dataclass
class _Sealed:
    seq: int
    path: Path
    rows: tuple[UsageRow, ...] | None  # None: released from memory, read back from the file
    synced: bool = False


class UsageJournal:
    """One process's journal. ``open()`` before appending; ``close()`` at exit."""

    def __init__(self, directory: Path, *, writer: str | None = None) -> None:
        self.directory = Path(directory)
        host = socket.gethostname().replace(".", "-").replace("/", "-")[:40]
        self.writer = writer or f"{host}-{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seq = 0
        self._active_bytes = 0
        self.sealed: list[_Sealed] = []

    @property
    def lock_path(self) -> Path:
        return self.directory / f"{self.writer}.lock"

    def open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Lock under a temporary name, then rename: a scanner never sees our lock file unlocked
        # (it would take us for dead and delete it).
        tmp = self.directory / f".{self.writer}.lock.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.replace(tmp, self.lock_path)
        self._lock_fd = fd

    def append(self, key_id: str, model: str, day: date, requests: int, tokens: int, cached_tokens: int) -> None:
        """One ``write(2)`` of one line (O_APPEND): on disk for every later reader once it returns."""
        if self._fd is None:
            self._seq += 1
            self._fd = os.open(self.directory / _segment_name(self.writer, self._seq),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._active_bytes = 0
        line = orjson.dumps([key_id, model, day.isoformat(), requests, tokens, cached_tokens]) + b"\n"
        os.write(self._fd, line)
        self._active_bytes += len(line)

    def seal(self, rows: tuple[UsageRow, ...]) -> None:
        """Close the active segment; ``rows`` is what was appended to it (kept to avoid a re-read)."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        self.sealed.append(_Sealed(self._seq, self.directory / _segment_name(self.writer, self._seq), rows))

    def segments(self) -> list[JournalSegment]:
        """The sealed segments, oldest first (rows read back from files where memory let them go)."""
        return [JournalSegment(self.writer, s.seq, s.rows if s.rows is not None else read_segment(s.path))
                for s in self.sealed]

    def release_memory(self, keep_rows: int) -> None:
        """Forget the rows of the oldest sealed segments beyond ``keep_rows`` (they stay on disk)."""
        total = 0
        for s in reversed(self.sealed):
            if s.rows is None:
                continue
            total += len(s.rows)
            if total > keep_rows:
                s.rows = None

    def applied(self, upto_seq: int) -> None:
        """Delete the sealed segments up to ``upto_seq`` (the store has them)."""
        keep = []
        for s in self.sealed:
            if s.seq <= upto_seq:
                with contextlib.suppress(FileNotFoundError):
                    s.path.unlink()
            else:
                keep.append(s)
        self.sealed = keep

    def sync(self) -> None:
        """fsync the sealed segments not yet synced (one batch per failed flush)."""
        for s in self.sealed:
            if not s.synced:
                with contextlib.suppress(FileNotFoundError):
                    fd = os.open(s.path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                s.synced = True
        with contextlib.suppress(OSError):
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def pending_segments(self) -> int:
        return len(self.sealed) + (self._fd is not None)

    # -- orphans ---------------------------------------------------------------------------
    def orphans(self) -> list[Orphan]:
        """Journals of writers that died (their lock is free), each now locked by us."""
        found: list[Orphan] = []
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return found
        segments: dict[str, list[Path]] = {}
        for entry in entries:
            parsed = _parse_name(entry.name)
            if parsed is not None:
                segments.setdefault(parsed[0], []).append(Path(entry.path))
        for entry in entries:
            if not entry.name.endswith(".lock") or entry.name.startswith("."):
                continue
            writer = entry.name[: -len(".lock")]
            if writer == self.writer:
                continue
            try:
                fd = os.open(entry.path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # alive
                continue
            # Segments written before we listed: a dead writer writes no more.
            found.append(Orphan(writer, fd, Path(entry.path), sorted(segments.get(writer, []))))
        return found

    @staticmethod
    def orphan_segments(orphan: Orphan) -> list[JournalSegment]:
        out = []
        for path in orphan.segments:
            parsed = _parse_name(path.name)
            if parsed is not None:
                out.append(JournalSegment(orphan.writer, parsed[1], read_segment(path)))
        return out

    @staticmethod
    def remove(orphan: Orphan) -> None:
        """Delete an orphan's files (after the store took them); the lock file goes last."""
        for path in orphan.segments:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        with contextlib.suppress(FileNotFoundError):
            orphan.lock_path.unlink()
        os.close(orphan.lock_fd)

    @staticmethod
    def release(orphan: Orphan) -> None:
        os.close(orphan.lock_fd)

    def close(self) -> None:
        """Stop writing; with nothing left pending our lock file goes too (else the journal stays
        for the next process to replay)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self.sealed.append(_Sealed(self._seq, self.directory / _segment_name(self.writer, self._seq), None))
        if self._lock_fd is not None:
            if not self.sealed:
                with contextlib.suppress(FileNotFoundError):
                    self.lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
