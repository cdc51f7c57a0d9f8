"""Build and drive the C relay (relay.c) that emulates rate, delay, jitter and loss.

The relay is compiled on first use with the system C compiler into a cache directory
keyed by the source's hash, so an edited relay.c is never run stale.  This module
only starts, talks to and stops the relay process; it never touches namespaces.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["Relay", "RelayError", "build_relay"]

SOURCE = Path(__file__).with_name("relay.c")


class RelayError(RuntimeError):
    """The relay could not be built, started or talked to."""


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dxa-lab"


def build_relay() -> Path:
    """Compile relay.c if needed and return the binary's path."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    binary = _cache_dir() / f"relay-{digest}"
    if binary.exists():
        return binary
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        raise RelayError("no C compiler (gcc) found: run bench/setup.sh")
    binary.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=binary.parent, prefix=".relay-")
    os.close(fd)
    proc = subprocess.run(
        [cc, "-O2", "-Wall", "-o", tmp, str(SOURCE)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RelayError(f"compiling relay.c failed:\n{proc.stderr}")
    os.replace(tmp, binary)
    return binary


class Relay:
    """One running relay process; owns the TUN devices named in its config."""

    def __init__(self, config_text: str, workdir: Path) -> None:
        self._config = workdir / "relay.conf"
        self._config.write_text(config_text)
        self._lock = threading.Lock()
        self._buf = b""
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        binary = build_relay()
        self.proc = subprocess.Popen(
            [str(binary), str(self._config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        line = self._readline(timeout)
        if not line.startswith("ready"):
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            self.stop()
            raise RelayError(f"relay did not start: {line!r} {err.strip()}")

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RelayError("relay did not answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return ""
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def command(self, text: str, timeout: float = 5.0) -> str:
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                raise RelayError("relay is not running")
            assert self.proc.stdin is not None
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
            return self._readline(timeout)

    def stats(self) -> dict[str, Any]:
        return json.loads(self.command("stats"))

    def set_port(self, index: int, up: bool) -> None:
        reply = self.command(f"{'up' if up else 'down'} {index}")
        if not reply.startswith("ok"):
            raise RelayError(f"relay refused: {reply}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write(b"quit\n")
                proc.stdin.flush()
            proc.wait(timeout=3)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
