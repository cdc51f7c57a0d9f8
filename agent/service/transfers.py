"""The agent daemon's transfer jobs: push copies from this agent to another, kept in SQLite.

A job is "send SOURCE (a path under this daemon's root) to ``dxa://HOST:PORT/path``": a
client that asks agent A to send to agent B (third-party copy) submits a job on A.  Each
job runs :func:`agent.aio.client.copy` on the daemon's event loop with its own
:class:`~agent.aio.pacing.SharedPacer`, so :meth:`JobManager.set_rate` changes the rate of
a running job at once.

Lifecycle: ``submitted`` → ``transferring`` → ``done`` / ``failed`` / ``cancelled``;
a job that goes through the scheduler (a ``scheduler`` link and a rate) also passes
``reserved`` once its reservation is admitted, and releases it when it ends.  A copy that
ends incomplete is re-run a few times, one that fails on the network (the destination
restarting, a path down) is retried with backoff until it has made no progress for
``retry_window`` (10 minutes); a re-run resumes from the destination's journal.
Cancel stops the copy; the partial data stays at the destination and a new job with the
same source and destination resumes it.

Persistence: one SQLite file (WAL) next to the daemon's resume journal.  Every state
change is written before it is announced; progress every second.  A daemon that stops
(or dies) leaves its unfinished jobs ``submitted`` or ``transferring``; the next
:meth:`JobManager.start` picks them up and runs them again, which resumes them.
Finished jobs are history: with a ``history_retention`` (``dxa serve --history-retention``)
those that ended longer ago are deleted, at start and every ``prune_interval`` seconds;
an unfinished job is never deleted.

Threading: a JobManager belongs to one event loop; call it from that loop only.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from agent.aio.client import CopyResult, copy, is_remote, parse_remote
from agent.aio.pacing import SharedPacer
from agent.aio.session import Progress
from agent.config import TransferOptions
from agent.core.pacer import check_rate
from agent.errors import BrokenConnectionError, ConfigError, DxaError, PathError
from agent.store.pki import Identity
from agent.store.safepath import RESERVED, SafeRoot, split_relpath

if TYPE_CHECKING:
    from agent.service.scheduling import SchedulerLink
    from controller_stub.ledger import Reservation

__all__ = [
    "InvalidTransferError",
    "JobError",
    "JobManager",
    "JobState",
    "Progressed",
    "RateChanged",
    "RateRefusedError",
    "StateChanged",
    "Transfer",
    "TransferEvent",
    "TransferSpec",
    "TransferStateError",
    "UnknownTransferError",
]

log = logging.getLogger(__name__)


class JobError(DxaError):
    """A job request that the manager refuses."""


class UnknownTransferError(JobError, KeyError):
    def __init__(self, transfer_id: str) -> None:
        super().__init__(transfer_id)
        self.transfer_id = transfer_id

    def __str__(self) -> str:
        return f"no transfer {self.transfer_id!r}"


class InvalidTransferError(JobError, ValueError):
    """A malformed or unsupported spec (bad path, bad URL, negative rate, ...)."""


class TransferStateError(JobError):
    """The operation does not apply in the transfer's state (e.g. cancel a finished one)."""


class RateRefusedError(JobError):
    """The scheduler refused a new rate for a scheduled job (no room on its path), or cannot be asked."""


class JobState(enum.Enum):
    SUBMITTED = "submitted"
    RESERVED = "reserved"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class TransferSpec:
    """Send ``source`` (relative to the source agent's root) to ``destination`` (a dxa URL)."""

    source: str
    destination: str
    rate_bps: int = 0
    """Pacing rate of the whole transfer in bits/s; 0 = unlimited."""
    priority: int = 0
    """Kept and reported; not acted upon until a scheduler orders transfers."""
    recursive: bool = False
    source_agent: str = ""
    """Empty or this agent's name: only this agent's own data can be sent from here."""
    window_start: float | None = None
    """Unix time before which the job does not start (needs the scheduler and a rate)."""
    window_end: float | None = None
    """Unix time at which the reservation ends (needs the scheduler and a rate)."""
    deadline: float | None = None
    """Deadline mode, instead of a rate: Unix time by which the data must have arrived.  The
    scheduler derives the rate from the volume and the time left (needs the scheduler)."""
    no_queue: bool = False
    """With the scheduler: fail with the earliest start that would fit instead of queueing."""


@dataclass
class Transfer:
    id: str
    spec: TransferSpec
    state: JobState = JobState.SUBMITTED
    rate_bps: int = 0
    """The pacing rate now (starts at ``spec.rate_bps``; SetRate changes it)."""
    bytes_total: int = 0
    bytes_done: int = 0
    bytes_skipped: int = 0
    files_total: int = 0
    files_done: int = 0
    chunks_retried: int = 0
    error: str = ""
    request_id: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    reservation_id: str = ""
    """The scheduler's reservation of this job (``dxa serve --controller``), else empty."""
    current_rate_bps: int = 0
    """Bits/s on the wire over the last progress interval while transferring (not stored)."""

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["spec"] = dict(self.spec.__dict__)
        d["state"] = self.state.value
        return d


@dataclass(frozen=True)
class StateChanged:
    transfer_id: str
    time: float
    old: JobState | None
    new: JobState
    error: str = ""


@dataclass(frozen=True)
class Progressed:
    transfer_id: str
    time: float
    bytes_done: int
    bytes_total: int
    files_done: int
    files_total: int
    current_rate_bps: int
    chunks_retried: int = 0


@dataclass(frozen=True)
class RateChanged:
    transfer_id: str
    time: float
    old_rate_bps: int
    new_rate_bps: int


TransferEvent = StateChanged | Progressed | RateChanged

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS transfers (
    num INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT,
    source TEXT NOT NULL, destination TEXT NOT NULL, spec_rate_bps INTEGER NOT NULL,
    priority INTEGER NOT NULL, recursive INTEGER NOT NULL, source_agent TEXT NOT NULL,
    state TEXT NOT NULL, rate_bps INTEGER NOT NULL,
    bytes_total INTEGER NOT NULL, bytes_done INTEGER NOT NULL, bytes_skipped INTEGER NOT NULL,
    files_total INTEGER NOT NULL, files_done INTEGER NOT NULL, chunks_retried INTEGER NOT NULL,
    error TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS transfers_request ON transfers(request_id) WHERE request_id IS NOT NULL;
"""
SCHEMA_VERSION = "1"


class JobStore:
    """The jobs table (SQLite, WAL).  Ids are ``t<N>``, never reused."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise ConfigError(f"{path}: transfer database schema {row[0]}, expected {SCHEMA_VERSION}")
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(transfers)")}
            if "reservation_id" not in columns:  # added to schema 1 in place: older files gain them
                self.db.execute("ALTER TABLE transfers ADD COLUMN reservation_id TEXT NOT NULL DEFAULT ''")
            if "window_start" not in columns:
                self.db.execute("ALTER TABLE transfers ADD COLUMN window_start REAL")
                self.db.execute("ALTER TABLE transfers ADD COLUMN window_end REAL")
            if "deadline" not in columns:
                self.db.execute("ALTER TABLE transfers ADD COLUMN deadline REAL")
            if "no_queue" not in columns:
                self.db.execute("ALTER TABLE transfers ADD COLUMN no_queue INTEGER NOT NULL DEFAULT 0")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise ConfigError(f"{path}: not a transfer database ({exc})") from None

    def close(self) -> None:
        self.db.close()

    def insert(self, t: Transfer) -> str:
        s = t.spec
        cur = self.db.execute(
            "INSERT INTO transfers (request_id, source, destination, spec_rate_bps, priority, recursive, source_agent,"
            " state, rate_bps, bytes_total, bytes_done, bytes_skipped, files_total, files_done, chunks_retried, error,"
            " created, updated, window_start, window_end, deadline, no_queue)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (t.request_id or None, s.source, s.destination, s.rate_bps, s.priority, int(s.recursive), s.source_agent,
             t.state.value, t.rate_bps, t.bytes_total, t.bytes_done, t.bytes_skipped, t.files_total, t.files_done,
             t.chunks_retried, t.error, t.created, t.updated, s.window_start, s.window_end, s.deadline,
             int(s.no_queue)))
        return f"t{cur.lastrowid}"

    def update(self, t: Transfer) -> None:
        self.db.execute(
            "UPDATE transfers SET state=?, rate_bps=?, bytes_total=?, bytes_done=?, bytes_skipped=?, files_total=?,"
            " files_done=?, chunks_retried=?, error=?, updated=?, reservation_id=? WHERE num=?",
            (t.state.value, t.rate_bps, t.bytes_total, t.bytes_done, t.bytes_skipped, t.files_total, t.files_done,
             t.chunks_retried, t.error, t.updated, t.reservation_id, int(t.id[1:])))

    def prune(self, before: float) -> list[str]:
        """Delete the finished jobs last updated before ``before``; return their ids."""
        final = [s.value for s in JobState if s.final]
        marks = ",".join("?" * len(final))
        where = f"state IN ({marks}) AND updated < ?"
        nums = [n for (n,) in self.db.execute(f"SELECT num FROM transfers WHERE {where}", (*final, before))]
        self.db.execute(f"DELETE FROM transfers WHERE {where}", (*final, before))
        return [f"t{n}" for n in nums]

    def load(self) -> list[Transfer]:
        rows = self.db.execute(
            "SELECT num, request_id, source, destination, spec_rate_bps, priority, recursive, source_agent, state,"
            " rate_bps, bytes_total, bytes_done, bytes_skipped, files_total, files_done, chunks_retried, error,"
            " created, updated, reservation_id, window_start, window_end, deadline, no_queue FROM transfers"
            " ORDER BY num"
        ).fetchall()
        out = []
        for (num, rid, src, dst, srate, prio, rec, sagent, state, rate, bt, bd, bs, ft, fd, cr, err, cre,
             upd, resv, wstart, wend, deadline, noq) in rows:
            spec = TransferSpec(src, dst, srate, prio, bool(rec), sagent, wstart, wend, deadline, bool(noq))
            out.append(Transfer(f"t{num}", spec, JobState(state), rate, bt, bd, bs, ft, fd, cr, err, rid or "",
                                cre, upd, resv or ""))
        return out


def _validate(spec: TransferSpec) -> TransferSpec:
    try:
        check_rate(spec.rate_bps)
        if not is_remote(spec.destination):
            raise ConfigError(f"destination must be dxa://HOST:PORT/path, got {spec.destination!r}")
        remote = parse_remote(spec.destination)
        if remote.path:
            split_relpath(remote.path)  # no "..", no absolute path: the destination would refuse it anyway
        source = spec.source.rstrip("/")
        if not source:
            raise PathError("the source path is empty")
        if split_relpath(source)[0] == RESERVED:
            raise PathError(f"{source!r}: the daemon's own state is not a source")
        if spec.deadline is not None:
            if spec.rate_bps:
                raise ConfigError("give a rate or a deadline, not both")
            if spec.window_end is not None:
                raise ConfigError("give a deadline or a window end, not both (both say when the data must be there)")
            if not math.isfinite(spec.deadline) or spec.deadline <= max(time.time(), spec.window_start or 0):
                raise ConfigError("the deadline has passed, or falls before the window starts")
        if spec.window_start is not None or spec.window_end is not None:
            if not spec.rate_bps and spec.deadline is None:
                raise ConfigError("a window needs a rate or a deadline")
            if spec.window_end is not None and spec.window_end <= max(time.time(), spec.window_start or 0):
                raise ConfigError("the window ends before it starts, or has already ended")
    except (ConfigError, PathError) as exc:
        raise InvalidTransferError(str(exc)) from None
    return replace(spec, source=source, rate_bps=int(spec.rate_bps))


def _tree_bytes(path: str, recursive: bool) -> int:
    """Size of a regular file, or of the regular files of a tree (symlinks not followed)."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):  # lstat: a symlink to a directory is not one
        return st.st_size
    if not recursive:
        return 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


RETRY_BACKOFF_MAX = 30.0
"""Longest wait between two tries of a copy that failed on the network."""

START_UP = 1.0
"""Seconds a scheduled copy needs before its first chunk moves (connect, list, hash); sized
into deadline and off-peak reservations (at most a quarter of a deadline's time left)."""


class _Running:
    """What a running job holds besides its row: the task, the pacer, the progress."""

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.pacer: SharedPacer | None = None
        self.progress = Progress()
        self.cancel_requested = False
        self.granted_bps: int | None = None
        """The reservation's rate last seen from the scheduler (scheduled jobs)."""


class JobManager:
    """Jobs of one daemon: ``await JobManager(root, db_path, identity).start()``; ``await close()``.

    ``root`` is the directory sources must lie under (the daemon's ``--root``);
    ``options`` the transfer options of every job (streams, chunk size, cipher...);
    ``attempts`` how many times a copy that ends incomplete is run before the job fails;
    ``retry_window`` how long network failures are retried (with backoff from
    ``retry_delay``, capped at 30 s) after the copy last made progress.

    ``scheduler`` (a started :class:`~agent.service.scheduling.SchedulerLink`, ``dxa serve
    --controller``): a job with a rate asks the scheduler for a reservation of that rate from
    this agent to the destination daemon (named by its certificate CN), stays ``submitted``
    while it waits, becomes ``reserved`` when admitted, starts it and runs paced at the
    granted rate, follows the reservation's rate (pushed by the scheduler's WatchReservations
    stream the moment it changes; polled every ``poll_interval`` seconds as the fallback)
    and releases it when the job ends.  A job without a rate runs outside the scheduler.
    """

    def __init__(self, root: str, db_path: str, identity: Identity, *, options: TransferOptions | None = None,
                 attempts: int = 3, retry_delay: float = 0.5, retry_window: float = 600.0,
                 progress_interval: float = 0.5,
                 scheduler: SchedulerLink | None = None, poll_interval: float = 0.5, metrics=None,
                 history_retention: float | None = None, prune_interval: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        if history_retention is not None and not (history_retention > 0 and math.isfinite(history_retention)):
            raise ConfigError("history retention must be a positive number of seconds")
        self.history_retention = history_retention
        """Seconds a finished job is kept (None: for ever)."""
        self.prune_interval = prune_interval
        self.clock = clock
        """Wall clock for the retention (tests inject one)."""
        self._pruner: asyncio.Task | None = None
        self.scheduler = scheduler
        self.metrics = metrics
        """The daemon's ServerMetrics (``dxa serve --metrics``): each job's copy is counted there."""
        self.poll_interval = poll_interval
        self.root = root
        self.db_path = db_path
        self.identity = identity
        self.options = replace(options or TransferOptions(), rate=0, recursive=False)
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay
        self.retry_window = retry_window
        self.progress_interval = progress_interval
        self._store: JobStore | None = None
        self._jobs: dict[str, Transfer] = {}
        self._running: dict[str, _Running] = {}
        self._subscribers: dict[str, set[asyncio.Queue]] = {}
        self._closing = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the database and resume every unfinished job."""
        self._store = JobStore(self.db_path)
        unfinished = []
        for t in self._store.load():
            self._jobs[t.id] = t
            if not t.state.final:
                unfinished.append(t)
        if self.history_retention is not None:
            self.prune_history()
            self._pruner = asyncio.get_running_loop().create_task(self._prune_forever(), name="dxa-prune-jobs")
        for t in unfinished:
            log.info("transfer %s: resuming (%s -> %s, was %s)", t.id, t.spec.source, t.spec.destination,
                     t.state.value)
            self._launch(t)

    def prune_history(self) -> int:
        """Delete the jobs that finished more than ``history_retention`` seconds ago; return how many."""
        if self._store is None or self.history_retention is None:
            return 0
        gone = self._store.prune(self.clock() - self.history_retention)
        for job_id in gone:
            self._jobs.pop(job_id, None)
        if gone:
            log.info("pruned %d finished transfers older than %.0f s (%s .. %s)", len(gone),
                     self.history_retention, gone[0], gone[-1])
        return len(gone)

    async def _prune_forever(self) -> None:
        while True:
            await asyncio.sleep(self.prune_interval)
            try:
                self.prune_history()
            except sqlite3.Error:  # the next round retries; the daemon must not stop over history
                log.exception("pruning the transfer history failed")

    async def close(self) -> None:
        """Stop running copies without changing their state: the next start resumes them."""
        self._closing = True
        if self._pruner is not None:
            self._pruner.cancel()
            await asyncio.gather(self._pruner, return_exceptions=True)
            self._pruner = None
        tasks = [r.task for r in self._running.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for q in (q for qs in self._subscribers.values() for q in qs):
            q.put_nowait(None)
        if self._store is not None:
            self._store.close()
            self._store = None

    async def __aenter__(self) -> JobManager:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ------------------------------------------------------------ API
    def submit(self, spec: TransferSpec, request_id: str = "") -> Transfer:
        """Accept a job (validated now, run in the background); a known ``request_id`` returns its job."""
        assert self._store is not None, "not started"
        spec = _validate(spec)
        if request_id:
            for t in self._jobs.values():
                if t.request_id == request_id:
                    if replace(t.spec, source_agent=spec.source_agent) != spec:
                        raise InvalidTransferError(
                            f"request id {request_id!r} was used for {t.id} ({t.spec.source} -> "
                            f"{t.spec.destination}); a retry must repeat the same transfer, a new one needs a new id")
                    return replace(t)
        if (spec.window_start is not None or spec.window_end is not None) and self.scheduler is None:
            raise InvalidTransferError("windows need the scheduler (dxa serve --controller HOST:PORT)")
        if spec.no_queue and self.scheduler is None:
            raise InvalidTransferError("no_queue needs the scheduler (dxa serve --controller HOST:PORT)")
        if spec.deadline is not None and self.scheduler is None:
            raise InvalidTransferError("a deadline needs the scheduler (dxa serve --controller HOST:PORT), which "
                                       "derives the rate from it; without one give a rate, or none (unlimited)")
        if spec.source_agent and spec.source_agent != self.identity.name:
            raise InvalidTransferError(
                f"this agent is {self.identity.name!r}: it sends only its own data (source agent "
                f"{spec.source_agent!r}); submit the transfer to the source agent")
        path = self._source_path(spec.source)  # exists, no symlink, under the root
        if os.path.isdir(path) and not spec.recursive:
            raise InvalidTransferError(f"{spec.source}: is a directory (send a tree with recursive, dxa submit -r)")
        now = time.time()
        t = Transfer("", spec, JobState.SUBMITTED, spec.rate_bps, request_id=request_id, created=now, updated=now)
        t.id = self._store.insert(t)
        self._jobs[t.id] = t
        log.info("transfer %s: submitted %s -> %s%s", t.id, spec.source, spec.destination,
                 f" at {spec.rate_bps} bit/s" if spec.rate_bps else "")
        self._launch(t)
        return replace(t)

    async def submit_settled(self, spec: TransferSpec, request_id: str = "", timeout: float = 10.0) -> Transfer:
        """:meth:`submit`, then for a job that goes through the scheduler, wait (at most
        ``timeout``) for the scheduler's first answer, so the caller learns at once whether it
        was admitted, queued (the reason in ``error``) or refused (``failed``)."""
        t = self.submit(spec, request_id)
        if not self._scheduled(t) or t.state is not JobState.SUBMITTED:
            return t
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self._job(t.id)
            if now.state is not JobState.SUBMITTED or now.reservation_id:
                break
            await asyncio.sleep(0.02)
        return self.get(t.id)

    def get(self, transfer_id: str) -> Transfer:
        return replace(self._job(transfer_id))

    def list(self, states: set[JobState] | frozenset[JobState] | None = None) -> list[Transfer]:
        return [replace(t) for t in self._jobs.values() if not states or t.state in states]

    def cancel(self, transfer_id: str) -> Transfer:
        """Stop the job (state ``cancelled`` once its copy has stopped); a final job cannot be cancelled."""
        t = self._job(transfer_id)
        if t.state.final:
            raise TransferStateError(f"{transfer_id} is {t.state.value}: cannot cancel")
        run = self._running.get(transfer_id)
        if run is not None and run.task is not None and not run.task.done():
            run.cancel_requested = True
            run.task.cancel()
        else:
            self._set_state(t, JobState.CANCELLED)
        return replace(t)

    async def cancel_and_wait(self, transfer_id: str) -> Transfer:
        self.cancel(transfer_id)
        run = self._running.get(transfer_id)
        if run is not None and run.task is not None:
            await asyncio.gather(run.task, return_exceptions=True)
        return self.get(transfer_id)

    def set_rate(self, transfer_id: str, rate_bps: int) -> Transfer:
        """New pacing rate (bits/s, 0 = unlimited) of an unfinished job, effective at once."""
        t = self._job(transfer_id)
        try:
            rate = int(check_rate(rate_bps))
        except ConfigError as exc:
            raise InvalidTransferError(str(exc)) from None
        if t.state.final:
            raise TransferStateError(f"{transfer_id} is {t.state.value}: cannot change its rate")
        old = t.rate_bps
        t.rate_bps = rate
        run = self._running.get(transfer_id)
        if run is not None and run.pacer is not None:
            run.pacer.set_rate(rate)
        self._save(t)
        log.info("transfer %s: rate %d -> %d bit/s", t.id, old, rate)
        if old != rate:
            self._emit(t.id, RateChanged(t.id, time.time(), old, rate))
        return replace(t)

    async def change_rate(self, transfer_id: str, rate_bps: int) -> Transfer:
        """:meth:`set_rate` as operators ask for it (``dxa rate``, SetRate): a job that holds a
        reservation changes only with the scheduler's consent — a raise once the scheduler
        has admitted it (it must fit on every link of the path), a lowering at once and then
        at the scheduler (so the path is never oversubscribed; undone if the scheduler
        refuses); other jobs at once."""
        t = self._job(transfer_id)
        if self.scheduler is not None and t.reservation_id and self._scheduled(t) and not t.state.final:
            from controller_stub.client import ControllerError

            try:
                rate = int(check_rate(rate_bps))
            except ConfigError as exc:
                raise InvalidTransferError(str(exc)) from None
            if not rate:
                raise InvalidTransferError(f"{transfer_id} runs on reservation {t.reservation_id}: its rate cannot be "
                                           f"unlimited (0); cancel it and submit it without a rate instead")
            old = t.rate_bps
            if rate < old and (t.spec.window_end is not None or t.spec.deadline is not None):
                await self._check_lowering_fits(t, rate)
            if rate < old:  # slow down first: the scheduler hands the difference to others at once
                self.set_rate(transfer_id, rate)
            try:
                r, _admitted = await self.scheduler.client.change_rate(t.reservation_id, rate)
            except ControllerError as exc:
                if rate < old and not t.state.final:
                    self.set_rate(transfer_id, old)
                raise RateRefusedError(f"the scheduler did not change reservation {t.reservation_id}: {exc}") from None
            run = self._running.get(transfer_id)
            if run is not None:
                run.granted_bps = r.rate_bps
            rate_bps = r.rate_bps
        return self.set_rate(transfer_id, rate_bps)

    async def _check_lowering_fits(self, t: Transfer, rate: int) -> None:
        """A reservation sized for a window or deadline keeps its end when its rate is lowered:
        refuse a rate at which what is left cannot arrive by then."""
        from controller_stub.client import ControllerError

        assert self.scheduler is not None
        try:
            r = await self.scheduler.lookup(t.reservation_id)
        except ControllerError as exc:
            raise RateRefusedError(f"cannot check reservation {t.reservation_id}: {exc}") from None
        if r is None or math.isinf(r.end):
            return
        left = max(0, t.bytes_total - t.bytes_done) if t.bytes_total else self._volume(t)
        need, remaining = left * 8 / rate, r.end - time.time()
        if need > remaining:
            raise RateRefusedError(
                f"at {rate} bit/s the {left} bytes left need {need:.0f} s, but reservation {r.id} ends in "
                f"{max(0.0, remaining):.0f} s (sized for its window); lower it less, or cancel the transfer and "
                f"submit it again with a later window or deadline")

    async def wait(self, transfer_id: str) -> Transfer:
        """Until the job is final (and its reservation released); its last state."""
        async for _ in self.watch(transfer_id):
            pass
        run = self._running.get(transfer_id)
        if run is not None and run.task is not None:  # its reservation released too
            await asyncio.gather(run.task, return_exceptions=True)
        return self.get(transfer_id)

    async def watch(self, transfer_id: str) -> AsyncIterator[TransferEvent]:
        """The current state and progress first, then every change until the job is final."""
        t = self._job(transfer_id)
        q: asyncio.Queue = asyncio.Queue()
        subs = self._subscribers.setdefault(transfer_id, set())
        subs.add(q)
        try:
            now = time.time()
            yield StateChanged(t.id, now, None, t.state, t.error)
            yield self._progressed(t, now, 0)
            if t.state.final:
                return
            while True:
                ev = await q.get()
                if ev is None:  # the manager is closing
                    return
                yield ev
                if isinstance(ev, StateChanged) and ev.new.final:
                    return
        finally:
            subs.discard(q)
            if not subs:
                self._subscribers.pop(transfer_id, None)

    # ------------------------------------------------------------ internals
    def _job(self, transfer_id: str) -> Transfer:
        t = self._jobs.get(transfer_id)
        if t is None:
            raise UnknownTransferError(transfer_id)
        return t

    def _source_path(self, rel: str) -> str:
        root = SafeRoot(self.root, create=False)
        try:
            return root.existing(rel, "under this agent's root")
        except (PathError, OSError) as exc:
            raise InvalidTransferError(str(exc)) from None
        finally:
            root.close()

    def _save(self, t: Transfer) -> None:
        t.updated = self.clock()
        if self._store is not None:
            self._store.update(t)

    def _emit(self, transfer_id: str, event: TransferEvent) -> None:
        for q in self._subscribers.get(transfer_id, ()):
            q.put_nowait(event)

    def _set_state(self, t: Transfer, state: JobState, error: str = "") -> None:
        old = t.state
        t.state, t.error = state, error
        if state is not JobState.TRANSFERRING:
            t.current_rate_bps = 0
        self._save(t)
        log.info("transfer %s: %s -> %s%s", t.id, old.value, state.value, f" ({error})" if error else "")
        self._emit(t.id, StateChanged(t.id, time.time(), old, state, error))

    @staticmethod
    def _progressed(t: Transfer, now: float, rate_bps: int) -> Progressed:
        return Progressed(t.id, now, t.bytes_done, t.bytes_total, t.files_done, t.files_total, rate_bps,
                          t.chunks_retried)

    def _launch(self, t: Transfer) -> None:
        run = _Running()
        self._running[t.id] = run
        run.task = asyncio.get_running_loop().create_task(self._run(t, run), name=f"dxa-transfer-{t.id}")

    def _scheduled(self, t: Transfer) -> bool:
        return self.scheduler is not None and bool(t.spec.rate_bps or t.spec.deadline is not None)

    async def _run(self, t: Transfer, run: _Running) -> None:
        loop = asyncio.get_running_loop()
        reporter = loop.create_task(self._report(t, run))
        try:
            if self._scheduled(t):
                assert self.scheduler is not None
                await self._run_scheduled(t, run, self.scheduler)
            else:
                await self._attempts(t, run)
        except asyncio.CancelledError:
            if run.cancel_requested and not self._closing:
                self._set_state(t, JobState.CANCELLED)
            elif self._store is not None:
                self._save(t)  # shutdown: stays unfinished, resumed by the next start
        except JobError as exc:  # refused by the scheduler: said in the job's error, no traceback
            self._set_state(t, JobState.FAILED, str(exc))
        except Exception as exc:  # a job never takes the daemon down
            log.exception("transfer %s failed", t.id)
            self._set_state(t, JobState.FAILED, str(exc) or type(exc).__name__)
        finally:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            if t.reservation_id and t.state.final and self.scheduler is not None:
                await self._release(t, self.scheduler)
            self._running.pop(t.id, None)

    async def _run_scheduled(self, t: Transfer, run: _Running, link: SchedulerLink) -> None:
        """Reserve, then copy while following the reservation.  When the scheduler ends the
        reservation under a running copy, the copy stops (its data stays resumable): released
        as cancelled (an operator) the job is cancelled; at the end of the job's window or
        deadline it fails; otherwise (lease lost while the scheduler was unreachable,
        preempted by a capacity cut) it waits for a new reservation and resumes."""
        loop = asyncio.get_running_loop()
        while True:
            await self._reserve(t, run, link)
            copying = loop.create_task(self._attempts(t, run))
            following = loop.create_task(self._follow(t, run, link))
            try:
                await asyncio.wait((copying, following), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (copying, following):
                    task.cancel()
                await asyncio.gather(copying, following, return_exceptions=True)
            if not copying.cancelled():
                copying.result()  # finished (or raised) before the reservation went away
                return
            r = following.result()
            reason = (r.reason or r.state.value) if r is not None else "unknown to the scheduler"
            if r is not None and r.state.value == "cancelled":  # an operator cancelled it at the scheduler
                self._set_state(t, JobState.CANCELLED, f"reservation {r.id} cancelled at the scheduler ({reason}); "
                                                       f"the partial data is kept: submit again to resume")
                return
            finish_by = t.spec.deadline if t.spec.deadline is not None else t.spec.window_end
            left = f"{t.bytes_done} of {t.bytes_total} bytes arrived" if t.bytes_total else "nothing arrived"
            if reason == "window ended" or finish_by is not None and time.time() >= finish_by:
                until = time.strftime("%H:%M:%S", time.localtime(r.end)) if r is not None else "?"
                what = ("its deadline" if t.spec.deadline is not None else
                        f"its reservation (sized for the data at {t.rate_bps} bit/s, until {until})")
                self._set_state(t, JobState.FAILED,
                                f"{what} ended before the transfer finished ({left}); the partial data is "
                                f"kept: submit the same transfer again to resume it")
                return
            log.warning("transfer %s: reservation %s released by the scheduler (%s); stopped, asking for a new one",
                        t.id, t.reservation_id, reason)
            self._set_state(t, JobState.SUBMITTED, f"reservation released by the scheduler ({reason}); "
                                                   f"waiting for a new one ({left})")

    # ------------------------------------------------------------ the scheduler
    async def _reserve(self, t: Transfer, run: _Running, link: SchedulerLink) -> None:
        """Until the job's reservation is TRANSFERRING (requested, admitted, started); its rate applied."""
        import grpc

        from agent.service.scheduling import peer_name
        from controller_stub.client import ControllerError
        from controller_stub.ledger import ReservationRequest, State

        backoff, dest_name = 0.2, ""
        request: ReservationRequest | None = None
        while True:
            try:
                r = await link.lookup(t.reservation_id) if t.reservation_id else None
                if r is None or r.state.released:
                    if r is not None and r.reason in ("deadline unreachable", "window ended"):
                        # The ledger gave up on it while it waited: the path is booked until too late.
                        raise JobError(f"the scheduler could not fit the transfer in its window: reservation "
                                       f"{r.id} {r.reason} while it waited (other reservations hold the path); "
                                       f"submit it with a later window or deadline")
                    if r is not None:
                        log.info("transfer %s: reservation %s was released (%s); asking again", t.id, r.id,
                                 r.reason or r.state.value)
                    await link.wait_registered()
                    if not dest_name:
                        remote = parse_remote(t.spec.destination)
                        dest_name = await peer_name(remote.host, remote.port, self.identity)
                    if t.spec.deadline is not None:
                        request = ReservationRequest(
                            link.name, dest_name, volume_bytes=self._volume(t), priority=t.spec.priority,
                            not_before=t.spec.window_start, finish_by=t.spec.deadline, transfer_id=t.id,
                            wait=not t.spec.no_queue)
                    else:  # with a window end: off-peak mode, a window sized for the volume slides within it
                        request = ReservationRequest(
                            link.name, dest_name, rate_bps=t.spec.rate_bps, priority=t.spec.priority,
                            volume_bytes=self._volume(t) if t.spec.window_end is not None else None,
                            not_before=t.spec.window_start, finish_by=t.spec.window_end, transfer_id=t.id,
                            wait=not t.spec.no_queue)
                    decision = await link.client.request_reservation(request)
                    when = (f"; earliest start that would fit: "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(decision.earliest_start))}"
                            if decision.earliest_start is not None else "")
                    if decision.reservation is None:
                        raise JobError(f"the scheduler refused the reservation ({decision.outcome.value}){when}")
                    r = decision.reservation
                    t.reservation_id = r.id
                    if r.state is State.SUBMITTED:  # say why it waits, and until when at the earliest
                        t.error = f"queued by the scheduler: reservation {r.id} waits for room on its path{when}"
                    self._save(t)
                    log.info("transfer %s: reservation %s %s (%s -> %s at %d bit/s)", t.id, r.id,
                             decision.outcome.value, link.name, dest_name, r.rate_bps)
                if r.state is State.SUBMITTED:
                    await link.wait_update(r.id, self.poll_interval)  # admitted: pushed at once
                    continue
                t.rate_bps = run.granted_bps = r.rate_bps
                if r.state is State.RESERVED:
                    if t.state is JobState.SUBMITTED:
                        self._set_state(t, JobState.RESERVED)
                    if r.start > time.time():  # the window opens later: wait for it (and watch the reservation)
                        await link.wait_update(r.id, min(self.poll_interval, r.start - time.time()))
                        continue
                    r = await link.client.start_reservation(r.id)
                    t.rate_bps = run.granted_bps = r.rate_bps
                self._save(t)
                return
            except ControllerError as exc:
                transient = (exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                             or exc.kind == "LeaseExpiredError"
                             or exc.kind == "UnknownAgentError" and link.name in exc.details)
                if not transient:
                    need = ""
                    if exc.kind == "DeadlineUnreachableError" and request is not None and request.volume_bytes:
                        rate = request.rate_bps or 0
                        need = (f" ({request.volume_bytes} bytes at {rate} bit/s need "
                                f"{request.volume_bytes * 8 / rate:.1f} s)" if rate else
                                f" ({request.volume_bytes} bytes)")
                    raise JobError(f"the scheduler refused the reservation: {exc}{need}") from None
                if exc.kind in ("UnknownAgentError", "LeaseExpiredError"):
                    link.register_again()
                log.warning("transfer %s: scheduler: %s; retrying", t.id, exc)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def _follow(self, t: Transfer, run: _Running, link: SchedulerLink) -> Reservation | None:
        """Apply the reservation's rate (changed by an operator or the scheduler) to the pacer;
        return when the scheduler has ended the reservation (None: it no longer knows it)."""
        from controller_stub.client import ControllerError

        while True:
            r = await link.wait_update(t.reservation_id, self.poll_interval)  # pushed at once, if at all
            if r is None:
                try:
                    r = await link.lookup(t.reservation_id)  # asks the scheduler only while not streaming
                except ControllerError as exc:  # the scheduler away: keep the granted rate
                    log.debug("transfer %s: cannot poll reservation %s: %s", t.id, t.reservation_id, exc)
                    continue
            if r is None or r.state.released:
                return r
            if r.rate_bps != run.granted_bps:
                run.granted_bps = r.rate_bps
                if not t.state.final:
                    self.set_rate(t.id, r.rate_bps)

    def _volume(self, t: Transfer) -> int:
        """The volume a job with a deadline or a window end asks the ledger to size its
        reservation for: the bytes still to move plus 2 % and 128 KiB (framing, the
        manifest), plus ``START_UP`` seconds for connecting, listing and hashing before the
        first chunk — at the rate (rate mode), or by asking for the rate that finishes that
        much before the deadline (deadline mode: the ledger spreads the volume over the time
        left, so the volume grows by time left / (time left - start-up))."""
        if t.bytes_total:
            left = max(0, t.bytes_total - t.bytes_done)
        else:
            left = _tree_bytes(self._source_path(t.spec.source), t.spec.recursive)
        volume = left + left // 50 + (128 << 10)
        if t.spec.deadline is not None:
            span = t.spec.deadline - max(time.time(), t.spec.window_start or 0.0)
            allowance = min(START_UP, span / 4)
            return math.ceil(volume * span / (span - allowance)) if span > 0 else volume
        return volume + math.ceil(t.spec.rate_bps / 8 * START_UP)

    async def _release(self, t: Transfer, link: SchedulerLink) -> None:
        """Release the job's reservation with the job's outcome (retried while the scheduler is away)."""
        from controller_stub.client import ControllerError
        from controller_stub.ledger import State

        outcome = {JobState.DONE: State.DONE, JobState.FAILED: State.FAILED}.get(t.state, State.CANCELLED)
        for attempt in range(5):
            try:
                await link.client.release_reservation(t.reservation_id, outcome, t.error)
                log.info("transfer %s: reservation %s released (%s)", t.id, t.reservation_id, outcome.value)
                return
            except ControllerError as exc:
                import grpc

                if exc.code is not grpc.StatusCode.UNAVAILABLE:
                    log.info("transfer %s: reservation %s not released: %s", t.id, t.reservation_id, exc)
                    return
                log.warning("transfer %s: releasing %s: %s; retrying", t.id, t.reservation_id, exc)
                await asyncio.sleep(0.5 * (attempt + 1))

    async def _attempts(self, t: Transfer, run: _Running) -> None:
        """Run the copy until it is verified.  A copy that ends incomplete is re-run up to
        ``attempts`` times; a network failure (the destination restarting, a path down) is
        retried with exponential backoff (capped at 30 s) for as long as the copy keeps
        making progress or ``retry_window`` seconds have not passed since it last did."""
        source = self._source_path(t.spec.source)
        opts = replace(self.options, recursive=t.spec.recursive)
        if t.state is not JobState.TRANSFERRING:
            self._set_state(t, JobState.TRANSFERRING)
        error, incomplete, tries = "", 0, 0
        backoff, last_progress = self.retry_delay, time.monotonic()
        while True:
            tries += 1
            run.progress = Progress()
            run.pacer = SharedPacer(t.rate_bps)
            done_before = t.bytes_done
            network = False
            try:
                result: CopyResult = await copy([source], t.spec.destination, identity=self.identity, options=opts,
                                                progress=run.progress, pacer=run.pacer, metrics=self.metrics,
                                                metrics_label=f"job-{t.id}")
            except (BrokenConnectionError, ConnectionError, OSError) as exc:
                error, network = str(exc) or type(exc).__name__, True
                t.bytes_done = max(t.bytes_done, run.progress.bytes_done)
            except DxaError as exc:  # authentication, path refused, protocol: re-running will not help
                self._set_state(t, JobState.FAILED, f"{type(exc).__name__}: {exc}")
                return
            else:
                t.bytes_total, t.bytes_skipped = result.bytes_total, result.bytes_skipped
                t.bytes_done = result.bytes_total if result.verified else run.progress.bytes_done
                t.files_total, t.files_done = result.files, result.files_ok
                t.chunks_retried += result.chunks_retried
                if result.verified:
                    t.error = ""
                    self._emit(t.id, self._progressed(t, time.time(), 0))
                    self._set_state(t, JobState.DONE)
                    return
                error = "; ".join(result.errors[:3]) or "incomplete"
                incomplete += 1
            finally:
                run.pacer = None
            if t.bytes_done > done_before:
                last_progress, backoff = time.monotonic(), self.retry_delay
            stalled = time.monotonic() - last_progress
            if not network and incomplete >= self.attempts:
                break
            if network and stalled >= self.retry_window:
                error = f"{error} (gave up after {stalled:.0f} s without progress)"
                break
            log.warning("transfer %s: try %d ended: %s; again in %.1f s", t.id, tries, error, backoff)
            t.error = f"retrying in {backoff:.0f} s: {error}"
            self._save(t)
            await asyncio.sleep(backoff)
            backoff = min(RETRY_BACKOFF_MAX, backoff * 2)
        self._set_state(t, JobState.FAILED, error)

    async def _report(self, t: Transfer, run: _Running) -> None:
        """Every ``progress_interval``: copy the copy's progress into the job, announce it, save it."""
        last_t, last_b, last_p = time.monotonic(), None, None
        last_save = 0.0
        while True:
            await asyncio.sleep(self.progress_interval)
            p = run.progress
            if t.state is not JobState.TRANSFERRING or not p.bytes_total and not p.files_total:
                continue
            t.bytes_total, t.bytes_done = p.bytes_total, p.bytes_done
            t.files_total, t.files_done = p.files_total, p.files_done
            # The current rate from the bytes on the wire as they move (not only whole verified
            # chunks, which at a low rate arrive seconds apart); a new attempt starts a new count.
            now, moved = time.monotonic(), p.bytes_moved
            rate = (0 if last_b is None or last_p is not p else
                    max(0, int((moved - last_b) * 8 / max(now - last_t, 1e-3))))
            last_t, last_b, last_p = now, moved, p
            t.current_rate_bps = rate
            self._emit(t.id, self._progressed(t, time.time(), rate))
            if now - last_save >= 1.0:
                last_save = now
                self._save(t)
