"""Files on disk at the receiving end: plan, write at offset, journal, finalize.

Every path goes through :class:`SafeRoot`; partial data lives in
``.<name>.dxa-part`` and reaches its final name only by ``rename`` after the whole
file checked out, so a partly transferred file is never visible under its final name.
Thread-safe: chunk writes come from several pump threads at once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading

from agent.errors import DiskFullError, PathError, StorageError
from agent.store.journal import Journal
from agent.store.safepath import SafeRoot, split_relpath
from agent.wire import (
    ACTION_REFUSE,
    ACTION_RESUME,
    ACTION_SEND,
    ACTION_SKIP,
    KIND_DIR,
    KIND_LINK,
    ManifestEntry,
    PlanEntry,
    chunk_digest,
)

__all__ = ["ReceiverStore", "part_name", "DestinationIsDirectory"]


class DestinationIsDirectory(PathError):
    """A file would land on an existing directory.  For a file named on the command line
    (a top-level entry) the whole session is refused: the command is wrong, not the copy."""


def part_name(name: str) -> str:
    return f".{name}.dxa-part"


def _reverify(fd: int, e: ManifestEntry, claimed: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Keep only the journal's chunks whose bytes in the partial file still hash right.

    The journal is written after the data reached the page cache, not necessarily the
    disk (unless fsync is on): after a power loss a claimed chunk may be zeros.  Reading
    back what we resume from makes that harmless: nothing unverified is ever counted.
    """
    buf = bytearray(e.chunk_size)
    good = []
    for i, digest in claimed:
        n = e.chunk_len(i)
        view = memoryview(buf)[:n]
        got = os.preadv(fd, [view], i * e.chunk_size)
        if got == n and chunk_digest(view) == digest:
            good.append((i, digest))
    return good


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(exc.errno, f"no space left on the destination device while {what}")
    return StorageError(exc.errno, f"{what}: {exc.strerror}")


DIRECT_ALIGN = 4096
"""O_DIRECT writes need the buffer, the offset and the length aligned to the device's
logical block size; 4096 covers every Linux block device."""


def _open_direct(name: str, parent: int) -> int:
    """A second descriptor on the partial file with O_DIRECT, or -1 where the file system
    (tmpfs, some network file systems) or the platform has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(name, os.O_WRONLY | flag | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return -1


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if not view.readonly else 1


class _Open:
    __slots__ = ("dest", "dfd", "dirty", "entry", "fd", "name", "parent", "wlock")

    def __init__(self, fd: int, parent: int, name: str, dest: str, entry: ManifestEntry, dfd: int = -1) -> None:
        self.fd, self.parent, self.name, self.dest, self.entry = fd, parent, name, dest, entry
        self.dfd = dfd
        """O_DIRECT twin of ``fd`` for whole aligned chunks (-1: none): the decrypted chunk goes
        from the pump's page-aligned buffer to the device without a copy into the page cache,
        the receiver's largest CPU cost on a buffered write."""
        self.dirty = False
        # writes to one file serialize on the inode lock anyway; waiting here sleeps
        # instead of spinning in the kernel (perf showed rwsem spinning with 4 streams)
        self.wlock = threading.Lock()


def _close(f: _Open) -> None:
    if f.dfd >= 0:
        os.close(f.dfd)
    os.close(f.fd)


DIRECT_MIN = 8 << 20
"""Files at least this large get an O_DIRECT descriptor (small files stay buffered: their
writes are small and the page cache lets them finish without waiting for the device)."""


class ReceiverStore:
    """The receiving side's files for one session, under ``root/base``."""

    def __init__(self, root: SafeRoot, journal: Journal, *, base: str = "", rename_top: str | None = None,
                 fsync: bool = False, direct: bool = True) -> None:
        self.root = root
        self.journal = journal
        self.fsync = fsync  # see docs/ARCHITECTURE.md, "Durability"
        self.direct = direct  # O_DIRECT for whole aligned chunks of big files (see _Open.dfd)
        self._base = split_relpath(base) if base else []
        self._rename_top = rename_top
        self._lock = threading.Lock()
        self._open: dict[int, _Open] = {}
        self._pending: list[tuple[str, int, bytes]] = []
        self._dirs: list[tuple[ManifestEntry, str]] = []

    def _rel(self, e: ManifestEntry) -> str:
        rel = e.relpath
        if self._rename_top is not None:
            _top, sep, rest = rel.partition("/")
            rel = self._rename_top + sep + rest
        split_relpath(rel)
        return "/".join([*self._base, rel])

    # -- planning ---------------------------------------------------------------
    def plan(self, entries: list[ManifestEntry]) -> list[PlanEntry]:
        """Decide send / skip / resume / refuse per entry (does file-system I/O)."""
        out = []
        for e in entries:
            try:
                out.append(self._plan_one(e))
            except DestinationIsDirectory:
                if "/" not in e.relpath:  # the file named on the command line: the command is wrong
                    raise
                out.append(PlanEntry(e.file_id, ACTION_REFUSE, [], f"{self._rel(e)}: exists and is a directory"))
            except PathError as exc:
                out.append(PlanEntry(e.file_id, ACTION_REFUSE, [], str(exc)))
            except OSError as exc:
                out.append(PlanEntry(e.file_id, ACTION_REFUSE, [], f"{e.relpath}: {exc.strerror}"))
        with self._lock:
            self.journal.commit()
        return out

    def _plan_one(self, e: ManifestEntry) -> PlanEntry:
        rel = self._rel(e)
        parent, name = self.root.parent_and_name(rel)
        if e.kind == KIND_DIR:
            self.root.dir_fd(split_relpath(rel), create=True)
            self._dirs.append((e, rel))
            return PlanEntry(e.file_id, ACTION_SKIP)
        if e.kind == KIND_LINK:
            return self._plan_link(e, rel, parent, name)
        dest = self.root.resolve(rel)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise DestinationIsDirectory(f"{rel}: is a directory at the destination; to copy into it, end the "
                                         "destination with /")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise PathError(f"{rel}: exists and is not a regular file; refusing to replace it")
        with self._lock:
            rec = self.journal.lookup(dest)
            if not self.journal.claim(dest, self):
                return PlanEntry(e.file_id, ACTION_REFUSE, [], f"{rel}: another transfer is writing it right now")
            if (st is not None and rec is not None and rec.complete
                    and rec.same_source(e.size, e.mtime_ns, e.chunk_size)
                    and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns):
                self.journal.release(self, dest)
                return PlanEntry(e.file_id, ACTION_SKIP)
            fd = os.open(part_name(name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent)
            dfd = _open_direct(part_name(name), parent) if self.direct and e.size >= DIRECT_MIN else -1
            self._open[e.file_id] = _Open(fd, parent, name, dest, e, dfd)
            try:
                part_size = os.fstat(fd).st_size
            except OSError as exc:
                raise _storage_error(exc, f"sizing {rel}") from None
            if rec is not None and not rec.complete and rec.same_source(e.size, e.mtime_ns, e.chunk_size) and rec.chunks:
                claimed = sorted((i, d) for i, d in rec.chunks.items() if i < e.chunks)
                have = _reverify(fd, e, claimed)
                if len(have) < len(claimed):
                    bad = sorted({i for i, _ in claimed} - {i for i, _ in have})
                    self.journal.drop_chunks(dest, bad)
                if have:
                    return PlanEntry(e.file_id, ACTION_RESUME, have)
            if e.chunks > 1:  # a one-chunk file resumes whole: only its completion is journaled
                self.journal.start(dest, e.size, e.mtime_ns, e.chunk_size)
            try:  # a new source version: no byte of an older one survives
                if part_size:
                    os.ftruncate(fd, 0)
            except OSError as exc:
                raise _storage_error(exc, f"truncating {rel}") from None
        return PlanEntry(e.file_id, ACTION_SEND)

    def _plan_link(self, e: ManifestEntry, rel: str, parent: int, name: str) -> PlanEntry:
        target = e.link_target
        if not target or os.path.isabs(target) or "\0" in target:
            raise PathError(f"{rel}: symlink target {target!r} is absolute; refused")
        depth = len(split_relpath(e.relpath)) - 1
        climbs = 0
        for p in target.split("/"):
            climbs = climbs - 1 if p == ".." else climbs + (p not in ("", "."))
            if climbs < -depth:
                raise PathError(f"{rel}: symlink target {target!r} escapes the tree; refused")
        try:
            old = os.readlink(name, dir_fd=parent)
        except OSError:
            old = None
        if old != target:
            if old is not None:
                os.unlink(name, dir_fd=parent)
            os.symlink(target, name, dir_fd=parent)
        return PlanEntry(e.file_id, ACTION_SKIP)

    # -- data -------------------------------------------------------------------
    def write_chunk(self, file_id: int, offset: int, data) -> None:
        f = self._open.get(file_id)
        if f is None:
            raise StorageError(errno.EBADF, f"file {file_id} is not open for writing")
        view = memoryview(data)
        fd = f.fd
        if f.dfd >= 0 and not (offset | view.nbytes) % DIRECT_ALIGN and not _address(view) % DIRECT_ALIGN:
            fd = f.dfd
        try:
            with f.wlock:
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
        except OSError as exc:
            raise _storage_error(exc, f"writing {f.entry.relpath}") from None
        f.dirty = True

    def record(self, file_id: int, chunk: int, digest: bytes) -> None:
        f = self._open.get(file_id)
        if f is not None and f.entry.chunks > 1:
            with self._lock:
                self._pending.append((f.dest, chunk, digest))

    def flush(self) -> None:
        """fdatasync what was written, then commit the journal rows that describe it."""
        with self._lock:
            rows, self._pending = self._pending, []
            dirty = [(f, os.dup(f.fd)) for f in self._open.values() if f.dirty and self.fsync]
            for f, _ in dirty:
                f.dirty = False
        # sync duplicates: finalize() may close the original descriptor meanwhile
        try:
            for f, fd in dirty:
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    raise _storage_error(exc, f"syncing {f.entry.relpath}") from None
        finally:
            for _, fd in dirty:
                os.close(fd)
        with self._lock:
            live = {f.dest for f in self._open.values()}
            rows = [r for r in rows if r[0] in live]
            if rows:
                self.journal.add_chunks(rows)
            self.journal.commit()

    def finalize(self, entry: ManifestEntry) -> None:
        """Check size, fsync, set mode and mtime, rename into place, mark complete."""
        f = self._open.get(entry.file_id)
        if f is None:
            raise StorageError(errno.EBADF, f"file {entry.file_id} is not open")
        try:
            if os.fstat(f.fd).st_size != entry.size:
                os.ftruncate(f.fd, entry.size)
            if self.fsync:
                os.fsync(f.fd)
            os.fchmod(f.fd, entry.mode & 0o7777)
            os.utime(f.fd, ns=(entry.mtime_ns, entry.mtime_ns))
            os.rename(part_name(f.name), f.name, src_dir_fd=f.parent, dst_dir_fd=f.parent)
        except OSError as exc:
            raise _storage_error(exc, f"finishing {entry.relpath}") from None
        with self._lock:
            self._open.pop(entry.file_id, None)
            self.journal.complete(f.dest, entry.size, entry.mtime_ns, entry.chunk_size)
            self.journal.release(self, f.dest)
        _close(f)

    def finish_dirs(self) -> None:
        """Directory modes and mtimes, deepest first (children change a directory's mtime)."""
        for e, rel in sorted(self._dirs, key=lambda x: -x[1].count("/")):
            try:
                fd = self.root.dir_fd(split_relpath(rel), create=False)
                os.fchmod(fd, e.mode & 0o7777)
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            except (OSError, PathError):
                pass

    def close(self) -> None:
        try:
            self.flush()
        finally:
            with self._lock:
                for f in self._open.values():
                    _close(f)
                self._open.clear()
                self.journal.release(self)
