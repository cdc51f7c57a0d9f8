"""The receiver's resume journal: SQLite in WAL mode (docs/PROTOCOL.md §6).

For each destination file it records the source version being received and the
digests of the chunks verified so far, then, once the file is renamed into place,
that it is complete.  The caller commits only after fdatasync-ing the partial files
the new rows describe, so the journal never claims data that is not on disk.
One Journal per database file is shared by every session of a daemon (SQLite allows
one writer at a time; per-session connections starved each other); every public
method takes the object's lock, so it is safe from any thread.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from functools import wraps
from dataclasses import dataclass

from agent.errors import DiskFullError, StorageError

log = logging.getLogger(__name__)

__all__ = ["Journal", "FileRecord"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    dest TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS chunks (
    dest TEXT NOT NULL,
    idx INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (dest, idx)
) WITHOUT ROWID;
"""


@dataclass(frozen=True, slots=True)
class FileRecord:
    size: int
    mtime_ns: int
    chunk_size: int
    complete: bool
    chunks: dict[int, bytes]

    def same_source(self, size: int, mtime_ns: int, chunk_size: int) -> bool:
        return (self.size, self.mtime_ns, self.chunk_size) == (size, mtime_ns, chunk_size)


BALLAST = 4 << 20


def _locked(method):
    @wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Journal:
    """``ballast`` bytes are set aside next to the database (``<path>.ballast``) and given
    up when the disk fills, so that the last commit still fits: a disk-full failure keeps
    the progress made before it."""

    def __init__(self, path: str, ballast: int = BALLAST) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._ballast = path + ".ballast"
        if ballast and not os.path.exists(self._ballast):
            _make_ballast(self._ballast, ballast)
        self._lock = threading.RLock()
        self._active: dict[str, object] = {}  # destination → the store receiving it now
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute("BEGIN")
        self._ops: list[tuple[str, object, bool]] = []  # this transaction's writes, to replay

    def _write(self, sql: str, params, many: bool = False) -> None:
        self._ops.append((sql, params, many))
        try:
            (self._db.executemany if many else self._db.execute)(sql, params)
        except sqlite3.Error as exc:
            raise _db_error(exc, self.path) from None

    @_locked
    def claim(self, dest: str, owner: object) -> bool:
        """Reserve ``dest`` for one transfer of this process; False while another is receiving it.
        (Across processes the partial file's own lock decides: see agent/store/receiving.py.)"""
        if self._active.setdefault(dest, owner) is not owner:
            return False
        return True

    @_locked
    def release(self, owner: object, dest: str | None = None) -> None:
        """Give back ``dest`` (or every destination ``owner`` holds)."""
        for d in [dest] if dest is not None else [d for d, o in self._active.items() if o is owner]:
            if self._active.get(d) is owner:
                del self._active[d]

    @_locked
    def close(self) -> None:
        """Commit what is pending and close; a failed commit only means those chunks are resent."""
        try:
            self.commit()
        except StorageError as exc:
            log.warning("journal %s: last commit lost (%s); those chunks will be sent again", self.path, exc)
        finally:
            self._db.close()

    @_locked
    def lookup(self, dest: str) -> FileRecord | None:
        row = self._db.execute("SELECT size, mtime_ns, chunk_size, complete FROM files WHERE dest=?", (dest,)).fetchone()
        if row is None:
            return None
        chunks = dict(self._db.execute("SELECT idx, digest FROM chunks WHERE dest=?", (dest,)).fetchall())
        return FileRecord(row[0], row[1], row[2], bool(row[3]), chunks)

    @_locked
    def start(self, dest: str, size: int, mtime_ns: int, chunk_size: int) -> None:
        """Begin (or restart) receiving ``dest`` from this source version; old chunks are dropped."""
        self._write("DELETE FROM chunks WHERE dest=?", (dest,))
        self._write("INSERT OR REPLACE INTO files VALUES (?,?,?,?,0)", (dest, size, mtime_ns, chunk_size))

    @_locked
    def add_chunks(self, rows: list[tuple[str, int, bytes]]) -> None:
        self._write("INSERT OR REPLACE INTO chunks VALUES (?,?,?)", list(rows), many=True)

    @_locked
    def drop_chunks(self, dest: str, indices: list[int]) -> None:
        self._write("DELETE FROM chunks WHERE dest=? AND idx=?", [(dest, i) for i in indices], many=True)

    @_locked
    def complete(self, dest: str, size: int, mtime_ns: int, chunk_size: int) -> None:
        self._write("DELETE FROM chunks WHERE dest=?", (dest,))
        self._write("INSERT OR REPLACE INTO files VALUES (?,?,?,?,1)", (dest, size, mtime_ns, chunk_size))

    @_locked
    def forget(self, dest: str) -> None:
        self._write("DELETE FROM chunks WHERE dest=?", (dest,))
        self._write("DELETE FROM files WHERE dest=?", (dest,))

    @_locked
    def commit(self) -> None:
        """Make everything since the last commit durable.  On failure (e.g. disk full) the
        batch is rolled back: the journal never claims a chunk it could not record."""
        ops, self._ops = self._ops, []
        try:
            self._commit()
        except DiskFullError:
            if not os.path.exists(self._ballast):
                raise
            os.unlink(self._ballast)
            log.warning("disk full: released the journal's ballast to record the progress made")
            for sql, params, many in ops:  # the failed COMMIT rolled them back
                (self._db.executemany if many else self._db.execute)(sql, params)
            self._commit()

    def _commit(self) -> None:
        db = self._db
        try:
            if db.in_transaction:
                db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise _db_error(exc, self.path) from None
        finally:
            if not db.in_transaction:
                try:
                    db.execute("BEGIN")
                except sqlite3.Error:
                    pass


def _make_ballast(path: str, size: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:  # no room (or no fallocate): go without
        os.close(fd)
        os.unlink(path)
        return
    os.close(fd)


def _db_error(exc: sqlite3.Error, path: str) -> StorageError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code == 13 or "full" in str(exc):  # SQLITE_FULL
        return DiskFullError(errno.ENOSPC, f"no space left for the journal {path}")
    return StorageError(errno.EIO, f"journal {path}: {exc}")
