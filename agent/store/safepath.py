"""A destination root that cannot be escaped.

Every path a peer names is split into components and walked from the root with
``O_NOFOLLOW | O_DIRECTORY`` directory descriptors, so neither ``..``, an absolute
path, nor a symlink planted anywhere under the root can make us write outside it.
Never call a plain ``open(root + relpath)`` on peer input.
"""

from __future__ import annotations

import errno
import os

from agent.errors import PathError

__all__ = ["SafeRoot", "split_relpath", "RESERVED"]

RESERVED = ".dxa"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_relpath(rel: str) -> list[str]:
    """Components of a peer-supplied relative path; PathError when it is not a plain relative path."""
    if not rel or "\0" in rel or rel.startswith("/") or "\\" in rel:
        raise PathError(f"{rel!r}: not a relative path")
    parts = rel.split("/")
    for p in parts:
        if p in ("", ".", ".."):
            raise PathError(f"{rel!r}: path escapes the root or has empty components")
        if len(p.encode()) > 255:
            raise PathError(f"{rel!r}: component too long")
    return parts


class SafeRoot:
    """Directory descriptors under one root, never crossing a symlink."""

    def __init__(self, root: str, *, create: bool = True) -> None:
        if create:
            os.makedirs(root, exist_ok=True)
        self.path = os.path.realpath(root)
        self._fd = os.open(self.path, _DIR_FLAGS)
        self._dirs: dict[tuple[str, ...], int] = {(): self._fd}

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def __enter__(self) -> "SafeRoot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dir_fd(self, parts: list[str] | tuple[str, ...], *, create: bool) -> int:
        """Descriptor of the directory ``parts`` (cached), created on the way when asked."""
        key = tuple(parts)
        fd = self._dirs.get(key)
        if fd is not None:
            return fd
        if key and key[0] == RESERVED and len(key) >= 1:
            raise PathError(f"{'/'.join(key)}: {RESERVED}/ is reserved for dxa's own state")
        parent = self.dir_fd(key[:-1], create=create)
        name = key[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise PathError(f"{'/'.join(key)}: no such directory") from None
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            fd = self._open_dir(parent, key)
        except OSError as exc:
            raise self._refuse(key, exc) from None
        self._dirs[key] = fd
        return fd

    def _open_dir(self, parent: int, key: tuple[str, ...]) -> int:
        try:
            return os.open(key[-1], _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise self._refuse(key, exc) from None

    @staticmethod
    def _refuse(key: tuple[str, ...], exc: OSError) -> PathError:
        where = "/".join(key)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return PathError(f"{where}: is a symlink or not a directory; refusing to write through it")
        return PathError(f"{where}: {exc.strerror}")

    def parent_and_name(self, rel: str, *, create: bool = True) -> tuple[int, str]:
        parts = split_relpath(rel)
        if parts[0] == RESERVED:
            raise PathError(f"{rel}: {RESERVED}/ is reserved for dxa's own state")
        return self.dir_fd(parts[:-1], create=create), parts[-1]

    def resolve(self, rel: str) -> str:
        """Absolute path for logs and journal keys (after the safe walk succeeded)."""
        return os.path.join(self.path, *split_relpath(rel))

    def existing(self, rel: str, where: str) -> str:
        """The absolute path of ``rel``, which must exist below the root without a symlink on
        the way (the last component itself is not followed either); PathError naming ``where``."""
        parts = split_relpath(rel)
        parent = self.dir_fd(parts[:-1], create=False)
        try:
            os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise PathError(f"{rel}: no such file or directory {where}") from None
        return self.resolve(rel)
