"""Files on disk at the receiving end: plan, write at offset, journal, finalize.

Every path goes through :class:`SafeRoot`; partial data lives in
``.<name>.dxa-part`` and reaches its final name only by ``rename`` after the whole
file checked out, so a partly transferred file is never visible under its final name.
Thread-safe: chunk writes come from several pump threads at once.

Rules (docs/ARCHITECTURE.md, "Receiving store"): a partial file is created with
``O_EXCL`` at the first write, never opened through a name someone else planted;
descriptors are bounded per session; setuid, setgid and sticky bits are dropped unless
asked for; what a session created and never journaled is removed when it ends.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import threading
from collections import OrderedDict

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

log = logging.getLogger(__name__)


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


def _open_direct(name: str, parent: int, ino: tuple[int, int] | None = None) -> int:
    """A second descriptor on the partial file with O_DIRECT, or -1 where the file system
    (tmpfs, some network file systems) or the platform has none, or where the name no
    longer leads to the inode ``ino`` (the buffered descriptor's file)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        fd = os.open(name, os.O_WRONLY | flag | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return -1
    st = os.fstat(fd)
    if ino is not None and (st.st_dev, st.st_ino) != ino:
        os.close(fd)
        return -1
    return fd


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) if not view.readonly else 1


class _File:
    """A planned, unfinished file: metadata always, descriptors only while it is in the
    store's descriptor cache (opened at the first write, closed when finished or evicted)."""

    __slots__ = ("dest", "dfd", "dirty", "entry", "fd", "ino", "journaled", "name", "parent", "users", "wlock")

    def __init__(self, parent: int, name: str, dest: str, entry: ManifestEntry) -> None:
        self.parent, self.name, self.dest, self.entry = parent, name, dest, entry
        self.fd = -1
        self.dfd = -1
        """O_DIRECT twin of ``fd`` for whole aligned chunks (-1: none): the decrypted chunk goes
        from the pump's page-aligned buffer to the device without a copy into the page cache,
        the receiver's largest CPU cost on a buffered write."""
        self.ino: tuple[int, int] | None = None
        """(st_dev, st_ino) of our partial file once it exists: a re-open must find the same one."""
        self.users = 0  # writes in flight: a file in use is never evicted
        self.journaled = False  # the partial file holds chunks the journal lists (resume needs it)
        self.dirty = False
        # writes to one file serialize on the inode lock anyway; waiting here sleeps
        # instead of spinning in the kernel (perf showed rwsem spinning with 4 streams)
        self.wlock = threading.Lock()

    @property
    def nfds(self) -> int:
        return (self.fd >= 0) + (self.dfd >= 0)


def _close(f: _File) -> None:
    if f.dfd >= 0:
        os.close(f.dfd)
    if f.fd >= 0:
        os.close(f.fd)
    f.fd = f.dfd = -1


DIRECT_MIN = 8 << 20
"""Files at least this large get an O_DIRECT descriptor (small files stay buffered: their
writes are small and the page cache lets them finish without waiting for the device)."""

MAX_OPEN_FILES = 64
"""Default cap on the descriptors one store keeps on partial files (ServerConfig.max_open_files)."""

SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX

BUSY = "the destination is being written by another dxa process"


def _try_lock(fd: int) -> bool:
    """An exclusive ``flock`` on the partial file, held as long as our descriptor is open: the
    lock that keeps two processes (two pulls to one path) from writing one file.  One lock
    per open partial file, so it costs nothing per planned file."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _locked_elsewhere(parent: int, part: str) -> bool:
    """Whether another process holds the lock of the partial file ``part`` (a regular file)."""
    try:
        if not stat.S_ISREG(os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode):
            return False
        fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    except OSError:
        return False
    try:
        if not _try_lock(fd):
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class ReceiverStore:
    """The receiving side's files for one session, under ``root/base``.

    Partial files are created (``O_EXCL``) at the first write, not at plan time, and at most
    ``max_open`` descriptors stay open (least recently written closed first, re-opened when
    written again); see docs/ARCHITECTURE.md, "Receiving store"."""

    def __init__(self, root: SafeRoot, journal: Journal, *, base: str = "", rename_top: str | None = None,
                 fsync: bool = False, direct: bool = True, max_open: int = MAX_OPEN_FILES,
                 keep_special_bits: bool = False) -> None:
        self.root = root
        self.journal = journal
        self.fsync = fsync  # see docs/ARCHITECTURE.md, "Durability"
        self.direct = direct  # O_DIRECT for whole aligned chunks of big files (see _File.dfd)
        self.max_open = max(1, max_open)
        self._mode_bits = 0o7777 if keep_special_bits else 0o7777 & ~SPECIAL_BITS
        self._base = split_relpath(base) if base else []
        self._rename_top = rename_top
        self._lock = threading.Lock()
        self._files: dict[int, _File] = {}
        self._cache: OrderedDict[int, _File] = OrderedDict()  # files with descriptors, oldest use first
        self._nfds = 0
        self._closed = False
        self._pending: list[tuple[str, int, bytes]] = []
        self._dirs: list[tuple[ManifestEntry, str]] = []

    @property
    def open_descriptors(self) -> int:
        """Descriptors this store holds on partial files right now."""
        return self._nfds

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
            try:
                return self._plan_file(e, rel, dest, parent, name, st, rec)
            except BaseException:
                self.journal.release(self, dest)
                raise

    def _plan_file(self, e: ManifestEntry, rel: str, dest: str, parent: int, name: str, st, rec) -> PlanEntry:
        if (st is not None and rec is not None and rec.complete
                and rec.same_source(e.size, e.mtime_ns, e.chunk_size)
                and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns):
            self._apply_mode(parent, name, st, e)  # a chmod alone still arrives
            self.journal.release(self, dest)
            return PlanEntry(e.file_id, ACTION_SKIP)
        f = _File(parent, name, dest, e)
        part = part_name(name)
        if _locked_elsewhere(parent, part):
            self.journal.release(self, dest)
            return PlanEntry(e.file_id, ACTION_REFUSE, [], f"{rel}: {BUSY}")
        if rec is not None and not rec.complete and rec.same_source(e.size, e.mtime_ns, e.chunk_size) and rec.chunks:
            fd = self._open_existing(parent, part, rel)
            if fd >= 0:
                if not _try_lock(fd):
                    os.close(fd)
                    self.journal.release(self, dest)
                    return PlanEntry(e.file_id, ACTION_REFUSE, [], f"{rel}: {BUSY}")
                try:
                    pst = os.fstat(fd)
                    claimed = sorted((i, d) for i, d in rec.chunks.items() if i < e.chunks)
                    have = _reverify(fd, e, claimed)
                except OSError as exc:
                    os.close(fd)
                    raise _storage_error(exc, f"reading back {rel}") from None
                if len(have) < len(claimed):
                    bad = sorted({i for i, _ in claimed} - {i for i, _ in have})
                    self.journal.drop_chunks(dest, bad)
                if have:  # keep the descriptor (and its lock) for the writes to come
                    f.ino, f.journaled = (pst.st_dev, pst.st_ino), True
                    self._files[e.file_id] = f
                    self._make_room(1)
                    f.fd = fd
                    self._nfds += 1
                    self._cache[e.file_id] = f
                    return PlanEntry(e.file_id, ACTION_RESUME, have)
                os.close(fd)
        # a new source version: no byte of an older one survives, and whatever has the
        # partial file's name (a stale part, a planted hard link or symlink) loses it; the
        # partial file is created afresh, with O_EXCL, at the first write
        self._discard(parent, part, rel)
        if e.chunks > 1:  # a one-chunk file resumes whole: only its completion is journaled
            self.journal.start(dest, e.size, e.mtime_ns, e.chunk_size)
        self._files[e.file_id] = f
        return PlanEntry(e.file_id, ACTION_SEND)

    @staticmethod
    def _discard(parent: int, part: str, rel: str) -> None:
        try:
            os.unlink(part, dir_fd=parent)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PathError(f"{rel}: cannot remove {part} ({exc.strerror}); refusing to write through it") from None

    def _open_existing(self, parent: int, part: str, rel: str) -> int:
        """A descriptor on the partial file a journaled resume wants, or -1 (no such file, or
        one we must not trust: not a regular file, linked elsewhere too, or not ours; such a
        file is dropped and the file sent whole)."""
        try:
            lst = os.stat(part, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return -1
        fd = -1
        if stat.S_ISREG(lst.st_mode):
            try:
                fd = os.open(part, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
            except OSError:
                fd = -1
        if fd >= 0:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid():
                return fd
            os.close(fd)
        log.warning("%s: partial file %s is not a plain file of ours (type %o, %d links, uid %d); "
                    "discarded, the file is sent whole", rel, part, stat.S_IFMT(lst.st_mode), lst.st_nlink, lst.st_uid)
        self._discard(parent, part, rel)
        return -1

    def _apply_mode(self, parent: int, name: str, st, e: ManifestEntry) -> None:
        """Give a file already complete here the mode the source has now (special bits as for
        a file received: see ``keep_special_bits``)."""
        want = e.mode & self._mode_bits
        if stat.S_IMODE(st.st_mode) == want:
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
            via_proc = False
        except PermissionError:  # e.g. mode 0200: no read access, but we own it
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            via_proc = True
        try:
            now = os.fstat(fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                raise PathError(f"{e.relpath}: replaced while being checked; refused")
            if via_proc:
                os.chmod(f"/proc/self/fd/{fd}", want)
            else:
                os.fchmod(fd, want)
        finally:
            os.close(fd)

    # -- descriptors --------------------------------------------------------------
    def _pin(self, f: _File) -> None:
        """Make sure ``f`` has its descriptors and keep them until ``_unpin`` (caller holds the lock)."""
        if self._closed:
            raise StorageError(errno.EBADF, f"{f.entry.relpath}: the session's store is closed")
        if f.fd < 0:
            self._make_room(2 if self.direct and f.entry.size >= DIRECT_MIN else 1)
            try:
                self._open_part(f)
            except OSError as exc:
                raise _storage_error(exc, f"opening the partial file of {f.entry.relpath}") from None
            self._nfds += f.nfds
        self._cache[f.entry.file_id] = f
        self._cache.move_to_end(f.entry.file_id)
        f.users += 1

    def _unpin(self, f: _File) -> None:
        f.users -= 1
        if self._closed and not f.users:
            self._drop(f)

    def _make_room(self, need: int) -> None:
        for victim in list(self._cache.values()):
            if self._nfds + need <= self.max_open:
                return
            if not victim.users:
                self._drop(victim)
        # more files in use at once than the cap (more writers than descriptors): go over it

    def _drop(self, f: _File) -> None:
        """Close ``f``'s descriptors (syncing first where the journal will rely on the data)."""
        if self._cache.pop(f.entry.file_id, None) is None:
            return
        try:
            if f.dirty and self.fsync and f.fd >= 0:
                os.fdatasync(f.fd)
                f.dirty = False
        except OSError as exc:
            raise _storage_error(exc, f"syncing {f.entry.relpath}") from None
        finally:
            self._nfds -= f.nfds
            _close(f)

    def _open_part(self, f: _File) -> None:
        part = part_name(f.name)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        if f.ino is None:  # ours to create: O_EXCL never opens what someone else put there
            for _ in range(3):
                try:
                    fd = os.open(part, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=f.parent)
                    break
                except FileExistsError:
                    if _locked_elsewhere(f.parent, part):
                        raise StorageError(errno.EBUSY, f"{f.entry.relpath}: {BUSY}") from None
                    self._discard(f.parent, part, f.entry.relpath)
            else:
                raise StorageError(errno.EEXIST, f"{f.entry.relpath}: {part} keeps being re-created by someone else")
            st = os.fstat(fd)
            f.ino = (st.st_dev, st.st_ino)
        else:
            fd = os.open(part, flags, dir_fd=f.parent)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != f.ino:
                os.close(fd)
                raise StorageError(errno.ESTALE, f"{f.entry.relpath}: {part} was replaced while being received")
        if not _try_lock(fd):
            os.close(fd)
            raise StorageError(errno.EBUSY, f"{f.entry.relpath}: {BUSY}")
        f.fd = fd
        if self.direct and f.entry.size >= DIRECT_MIN:
            f.dfd = _open_direct(part, f.parent, f.ino)

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
        f = self._files.get(file_id)
        if f is None:
            raise StorageError(errno.EBADF, f"file {file_id} is not open for writing")
        with self._lock:
            self._pin(f)
        try:
            view = memoryview(data)
            fd = f.fd
            if f.dfd >= 0 and not (offset | view.nbytes) % DIRECT_ALIGN and not _address(view) % DIRECT_ALIGN:
                fd = f.dfd
            with f.wlock:
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
            f.dirty = True
        except OSError as exc:
            raise _storage_error(exc, f"writing {f.entry.relpath}") from None
        finally:
            with self._lock:
                self._unpin(f)

    def record(self, file_id: int, chunk: int, digest: bytes) -> None:
        f = self._files.get(file_id)
        if f is not None and f.entry.chunks > 1:
            with self._lock:
                self._pending.append((f.dest, chunk, digest))

    def flush(self) -> None:
        """fdatasync what was written, then commit the journal rows that describe it."""
        with self._lock:
            rows, self._pending = self._pending, []
            dirty = [(f, os.dup(f.fd)) for f in self._cache.values() if f.dirty and self.fsync and f.fd >= 0]
            for f, _ in dirty:
                f.dirty = False
        # sync duplicates: finalize() or an eviction may close the original descriptor meanwhile
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
            live = {f.dest: f for f in self._files.values()}
            rows = [r for r in rows if r[0] in live]
            if rows:
                self.journal.add_chunks(rows)
            self.journal.commit()
            for r in rows:
                live[r[0]].journaled = True

    def finalize(self, entry: ManifestEntry) -> None:
        """Check size, fsync, set mode and mtime, rename into place, mark complete."""
        f = self._files.get(entry.file_id)
        if f is None:
            raise StorageError(errno.EBADF, f"file {entry.file_id} is not open")
        with self._lock:
            self._pin(f)  # a file with no data (size 0) is created here
        try:
            if os.fstat(f.fd).st_size != entry.size:
                os.ftruncate(f.fd, entry.size)
            if self.fsync:
                os.fsync(f.fd)
            os.fchmod(f.fd, entry.mode & self._mode_bits)
            os.utime(f.fd, ns=(entry.mtime_ns, entry.mtime_ns))
            now = os.stat(part_name(f.name), dir_fd=f.parent, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != f.ino:
                raise StorageError(errno.ESTALE, f"finishing {entry.relpath}: its partial file was replaced")
            os.rename(part_name(f.name), f.name, src_dir_fd=f.parent, dst_dir_fd=f.parent)
        except OSError as exc:
            raise _storage_error(exc, f"finishing {entry.relpath}") from None
        finally:
            with self._lock:
                self._unpin(f)
        with self._lock:
            self._files.pop(entry.file_id, None)
            f.dirty = False  # fsynced above when it matters
            self._drop(f)
            self.journal.complete(f.dest, entry.size, entry.mtime_ns, entry.chunk_size)
            self.journal.release(self, f.dest)

    def finish_dirs(self) -> None:
        """Directory modes and mtimes, deepest first (children change a directory's mtime)."""
        for e, rel in sorted(self._dirs, key=lambda x: -x[1].count("/")):
            try:
                fd = self.root.dir_fd(split_relpath(rel), create=False)
                os.fchmod(fd, e.mode & self._mode_bits)
                os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))
            except (OSError, PathError):
                pass

    def close(self) -> None:
        """Commit what was verified, close every descriptor, and remove what this session
        created and the journal does not list (a partial file with no journaled chunk is
        no use to a resume); partial files holding journaled chunks stay for the re-run."""
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
                for f in list(self._cache.values()):
                    if not f.users:  # a write in flight closes its file when it ends (_unpin)
                        try:
                            self._drop(f)
                        except StorageError:
                            pass
                for f in self._files.values():
                    if not f.journaled:
                        self._remove_unjournaled(f)
                self._files.clear()
                self.journal.release(self)
                try:
                    self.journal.commit()
                except StorageError:
                    pass

    def _remove_unjournaled(self, f: _File) -> None:
        if f.entry.chunks > 1:
            self.journal.forget(f.dest)
        if f.ino is None:
            return
        part = part_name(f.name)
        try:
            st = os.stat(part, dir_fd=f.parent, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == f.ino:
                os.unlink(part, dir_fd=f.parent)
        except OSError:
            pass
