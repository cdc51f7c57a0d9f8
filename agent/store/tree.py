"""Listing what to send: local source trees turned into manifest entries.

Symlink policy (docs/ARCHITECTURE.md): a symlink is never followed.  Inside a tree
copied with ``-r`` it is recreated as a symlink when its target is relative and
stays inside the tree being copied; otherwise it is skipped with a warning.  A
source given on the command line that is itself a symlink is refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from agent.errors import PathError
from agent.wire import KIND_DIR, KIND_FILE, KIND_LINK, ManifestEntry

__all__ = ["SourceTree", "scan_sources", "source_version"]


@dataclass
class SourceTree:
    """Manifest entries plus where each file is read from locally."""

    entries: list[ManifestEntry] = field(default_factory=list)
    paths: dict[int, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    versions: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Per file, :func:`source_version` of it as listed: the reader checks it before and
    after every read (docs/PROTOCOL.md section 6)."""

    def add(self, rel: str, kind: str, st: os.stat_result, chunk_size: int, path: str, target: str = "") -> None:
        fid = len(self.entries)
        size = st.st_size if kind == KIND_FILE else 0
        self.entries.append(ManifestEntry(fid, rel, kind, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, chunk_size, target))
        self.paths[fid] = path
        if kind == KIND_FILE:
            self.versions[fid] = source_version(st)


def source_version(st: os.stat_result) -> tuple[int, ...]:
    """What must not change while a file is read: its identity (device, inode), size, mtime
    and ctime.  ctime catches a rewrite whose mtime was put back (``touch -d``), which
    (size, mtime) alone does not: the kernel sets ctime on every write and every utime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _inside(tree_top: str, link_dir: str, target: str) -> bool:
    if os.path.isabs(target):
        return False
    resolved = os.path.normpath(os.path.join(link_dir, target))
    return resolved == tree_top or resolved.startswith(tree_top + os.sep)


def scan_sources(sources: list[str], *, recursive: bool, chunk_size: int, name_as: str | None = None) -> SourceTree:
    """Entries for ``sources``.  Each source lands under its own basename, or under
    ``name_as`` when there is exactly one source (``cp a b`` semantics).
    Raises PathError for missing sources, directories without ``recursive``, and
    command-line symlinks."""
    tree = SourceTree()
    if name_as is not None and len(sources) != 1:
        raise PathError("name_as needs exactly one source")
    for src in sources:
        try:
            st = os.lstat(src)
        except FileNotFoundError:
            raise PathError(f"{src}: no such file or directory") from None
        top_name = name_as if name_as is not None else os.path.basename(os.path.normpath(src))
        if stat.S_ISLNK(st.st_mode):
            raise PathError(f"{src}: is a symlink; dxa never follows symlinks (copy its target instead)")
        if stat.S_ISREG(st.st_mode):
            tree.add(top_name, KIND_FILE, st, chunk_size, os.path.abspath(src))
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise PathError(f"{src}: not a regular file or directory")
        if not recursive:
            raise PathError(f"{src}: is a directory (use -r)")
        top = os.path.abspath(src)
        tree.add(top_name, KIND_DIR, st, chunk_size, top)
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, top)
            prefix = top_name if rel_dir == "." else f"{top_name}/{rel_dir.replace(os.sep, '/')}"
            for name in dirnames + sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = f"{prefix}/{name}"
                try:
                    est = os.lstat(path)
                except OSError as exc:
                    tree.warnings.append(f"{path}: skipped ({exc.strerror})")
                    continue
                if stat.S_ISLNK(est.st_mode):
                    target = os.readlink(path)
                    if _inside(top, dirpath, target):
                        tree.add(rel, KIND_LINK, est, chunk_size, path, target)
                    else:
                        tree.warnings.append(f"{path}: symlink to {target!r} points outside the tree; skipped")
                elif stat.S_ISDIR(est.st_mode):
                    tree.add(rel, KIND_DIR, est, chunk_size, path)
                elif stat.S_ISREG(est.st_mode):
                    tree.add(rel, KIND_FILE, est, chunk_size, path)
                else:
                    tree.warnings.append(f"{path}: not a regular file, directory or symlink; skipped")
    return tree
