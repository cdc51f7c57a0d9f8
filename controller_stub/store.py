"""The scheduler's SQLite database: sites, links, agents and reservations, so that a
restarted scheduler knows what it granted.

The ledger stays sans-I/O: the service layer calls ``LedgerStore.save(ledger.snapshot())``
after every change and before it answers, and ``Ledger.restore(store.load(), now)`` at
start.  A save is one transaction that replaces the whole state (WAL journal,
``synchronous=FULL``, so an acknowledged reservation survives a power loss); the state
of a scheduler is small (agents, links, reservations), and one transaction per change
can never leave half of a change on disk.  Released reservations are kept as history
until the service prunes them (its ``--history-retention``).

A save writes only what changed since the last save (the rows of the reservations that
changed, were added or were pruned; the small tables whole): the cost of a change does
not grow with the history.  The store keeps the rows it last wrote to tell.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path

from controller_stub.errors import LedgerStoreError
from controller_stub.ledger import (
    Agent,
    LedgerSnapshot,
    Link,
    Reservation,
    ReservationRequest,
    State,
)

__all__ = ["LedgerStore", "SCHEMA_VERSION"]

_COLUMNS = ("id, seq, state, source, destination, req_rate_bps, volume_bytes, not_before, finish_by, priority, wait,"
            " req_path, transfer_id, path, rate_bps, start, end_, submitted_at, reason, released_at")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sites (name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS links (
    id TEXT PRIMARY KEY, src TEXT NOT NULL, dst TEXT NOT NULL, capacity_bps INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY, site TEXT NOT NULL, addresses TEXT NOT NULL, capacity_bps INTEGER NOT NULL,
    lease_expires REAL NOT NULL, expired INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, state TEXT NOT NULL,
    source TEXT NOT NULL, destination TEXT NOT NULL, req_rate_bps INTEGER, volume_bytes INTEGER,
    not_before REAL, finish_by REAL, priority INTEGER NOT NULL, wait INTEGER NOT NULL,
    req_path TEXT, transfer_id TEXT NOT NULL,
    path TEXT NOT NULL, rate_bps INTEGER NOT NULL, start REAL NOT NULL, end_ REAL,
    submitted_at REAL NOT NULL, reason TEXT NOT NULL, released_at REAL);
"""


class LedgerStore:
    """One SQLite file, owned by one scheduler process."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise LedgerStoreError(f"{self.path}: {exc}") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise LedgerStoreError(f"{self.path}: schema version {row[0]}, this dxa reads {SCHEMA_VERSION}")
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(reservations)")}
            if "released_at" not in columns:  # added to schema 1 in place: older files gain it
                self._db.execute("ALTER TABLE reservations ADD COLUMN released_at REAL")
            self._rows: dict[str, tuple] | None = None  # what the file holds, once known
        except sqlite3.Error as exc:
            self._db.close()
            raise LedgerStoreError(f"{self.path}: {exc}") from None
        except LedgerStoreError:
            self._db.close()
            raise

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def save(self, snap: LedgerSnapshot) -> None:
        """Replace the stored state by ``snap``, atomically (writing only the reservations that changed)."""
        db = self._db
        rows = {r.id: _reservation_row(r) for r in snap.reservations}
        try:
            db.execute("BEGIN IMMEDIATE")
            if self._rows is None:  # first save since opening: read what is there
                self._rows = {row[0]: tuple(row) for row in db.execute(f"SELECT {_COLUMNS} FROM reservations")}
            gone = [(i,) for i in self._rows.keys() - rows.keys()]
            changed = [row for i, row in rows.items() if self._rows.get(i) != row]
            for table in ("sites", "links", "agents"):
                db.execute(f"DELETE FROM {table}")
            db.executemany("INSERT INTO sites VALUES (?)", [(s,) for s in snap.sites])
            db.executemany("INSERT INTO links VALUES (?,?,?,?)",
                           [(k.id, k.src, k.dst, k.capacity_bps) for k in snap.links])
            db.executemany("INSERT INTO agents VALUES (?,?,?,?,?,?)",
                           [(a.name, a.site, json.dumps(list(a.addresses)), a.capacity_bps, a.lease_expires,
                             int(a.expired)) for a in snap.agents])
            db.executemany("DELETE FROM reservations WHERE id=?", gone)
            db.executemany(f"INSERT OR REPLACE INTO reservations ({_COLUMNS}) VALUES ({','.join('?' * 20)})",
                           changed)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (str(snap.next_seq),))
            db.execute("COMMIT")
        except (sqlite3.Error, OverflowError) as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._rows = None  # unknown again: re-read at the next save
            raise LedgerStoreError(f"{self.path}: saving the ledger failed: {exc}") from None
        self._rows = rows

    def load(self) -> LedgerSnapshot | None:
        """The last saved state, or None if nothing was ever saved here."""
        db = self._db
        try:
            row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            if row is None:
                return None
            sites = tuple(s for (s,) in db.execute("SELECT name FROM sites ORDER BY name"))
            links = tuple(Link(*r) for r in db.execute("SELECT id, src, dst, capacity_bps FROM links ORDER BY id"))
            agents = tuple(Agent(name, site, tuple(json.loads(addresses)), capacity, lease, bool(expired))
                           for name, site, addresses, capacity, lease, expired
                           in db.execute("SELECT * FROM agents ORDER BY name"))
            reservations = tuple(_reservation(r) for r in
                                 db.execute(f"SELECT {_COLUMNS} FROM reservations ORDER BY seq"))
        except (sqlite3.Error, ValueError, TypeError) as exc:
            raise LedgerStoreError(f"{self.path}: reading the ledger failed: {exc}") from None
        return LedgerSnapshot(sites, links, agents, reservations, int(row[0]))


def _reservation_row(r: Reservation) -> tuple:
    q = r.request
    return (r.id, r.seq, r.state.value, q.source, q.destination, q.rate_bps, q.volume_bytes, q.not_before,
            q.finish_by, q.priority, int(q.wait), None if q.path is None else json.dumps(list(q.path)),
            q.transfer_id, json.dumps(list(r.path)), r.rate_bps, r.start, None if r.end == math.inf else r.end,
            r.submitted_at, r.reason, r.released_at)


def _reservation(row: tuple) -> Reservation:
    (rid, seq, state, source, destination, req_rate, volume, not_before, finish_by, priority, wait, req_path,
     transfer_id, path, rate, start, end, submitted_at, reason, released_at) = row
    request = ReservationRequest(source, destination, rate_bps=req_rate, volume_bytes=volume, not_before=not_before,
                                 finish_by=finish_by, priority=priority, wait=bool(wait),
                                 path=None if req_path is None else tuple(json.loads(req_path)),
                                 transfer_id=transfer_id)
    return Reservation(rid, request, tuple(json.loads(path)), rate, start, math.inf if end is None else end,
                       State(state), seq, submitted_at, reason, released_at)
