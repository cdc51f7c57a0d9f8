"""The receiver's resume journal: SQLite in WAL mode (docs/PROTOCOL.md §6).

For each destination file it records the source version being received and the
digests of the chunks verified so far, then, once the file is renamed into place,
that it is complete.  The caller commits only after fdatasync-ing the partial files
the new rows describe, so the journal never claims data that is not on disk.
One Journal object is used from one thread at a time.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

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


class Journal:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.execute("BEGIN")

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()

    def lookup(self, dest: str) -> FileRecord | None:
        row = self._db.execute("SELECT size, mtime_ns, chunk_size, complete FROM files WHERE dest=?", (dest,)).fetchone()
        if row is None:
            return None
        chunks = dict(self._db.execute("SELECT idx, digest FROM chunks WHERE dest=?", (dest,)).fetchall())
        return FileRecord(row[0], row[1], row[2], bool(row[3]), chunks)

    def start(self, dest: str, size: int, mtime_ns: int, chunk_size: int) -> None:
        """Begin (or restart) receiving ``dest`` from this source version; old chunks are dropped."""
        self._db.execute("DELETE FROM chunks WHERE dest=?", (dest,))
        self._db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,0)", (dest, size, mtime_ns, chunk_size))

    def add_chunks(self, rows: list[tuple[str, int, bytes]]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO chunks VALUES (?,?,?)", rows)

    def drop_chunks(self, dest: str, indices: list[int]) -> None:
        self._db.executemany("DELETE FROM chunks WHERE dest=? AND idx=?", [(dest, i) for i in indices])

    def complete(self, dest: str, size: int, mtime_ns: int, chunk_size: int) -> None:
        self._db.execute("DELETE FROM chunks WHERE dest=?", (dest,))
        self._db.execute("INSERT OR REPLACE INTO files VALUES (?,?,?,?,1)", (dest, size, mtime_ns, chunk_size))

    def forget(self, dest: str) -> None:
        self._db.execute("DELETE FROM chunks WHERE dest=?", (dest,))
        self._db.execute("DELETE FROM files WHERE dest=?", (dest,))

    def commit(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
