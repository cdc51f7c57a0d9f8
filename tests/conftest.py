"""Shared fixtures: an identity home, an in-process server, a daemon subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path) -> Path:
    from agent.store.pki import init_home

    h = tmp_path / "home"
    init_home(h, "node-a")
    return h


@pytest.fixture
def identity(home):
    from agent.store.pki import load_identity

    return load_identity(home)


class InProcessServer:
    """A Server on its own event loop in a background thread (the client runs asyncio.run in the test)."""

    def __init__(self, root: Path, identity, **kw) -> None:
        from agent.aio.server import Server
        from agent.config import ServerConfig

        self.root = root
        self.loop = asyncio.new_event_loop()
        self.server = Server(ServerConfig.for_test(str(root), **kw), identity)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.port = self.server.port

    def url(self, path: str = "") -> str:
        return f"dxa://127.0.0.1:{self.port}/{path}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def server(tmp_path, identity):
    srv = InProcessServer(tmp_path / "root", identity)
    yield srv
    srv.close()


class Daemon:
    """`dxa serve` as a real process (for kill -9 tests)."""

    def __init__(self, home: Path, root: Path, port: int = 0, extra_env: dict | None = None,
                 log_dir: Path | None = None) -> None:
        self.home, self.root = home, root
        log_dir = log_dir or root.parent
        self.log_path = log_dir / "daemon.log"
        self.port_file = log_dir / f"port-{time.monotonic_ns()}"
        env = dict(os.environ, DXA_HOME=str(home), PYTHONPATH=str(REPO), **(extra_env or {}))
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli.main", "serve", "--listen", f"127.0.0.1:{port}", "--root", str(root),
             "--port-file", str(self.port_file)], env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 20
        while not self.port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {self.log_path.read_text()}")
            time.sleep(0.05)
        self.port = int(self.port_file.read_text())

    def url(self, path: str = "") -> str:
        return f"dxa://127.0.0.1:{self.port}/{path}"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture
def daemon_factory(tmp_path, home):
    started: list[Daemon] = []

    def make(root: Path | None = None, port: int = 0, **kw) -> Daemon:
        d = Daemon(home, root or tmp_path / "root", port, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def dxa(home: Path, *args: str, check: bool = False, timeout: float = 120, env: dict | None = None):
    """Run the CLI as a user would; returns CompletedProcess."""
    e = dict(os.environ, DXA_HOME=str(home), PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "agent.cli.main", *args], env=e, capture_output=True, text=True,
                          timeout=timeout, check=check)


def make_tree(root: Path, *, files: int = 20, big: int = 0, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        d = root / ("sub/deeper" if i % 3 == 0 else "sub" if i % 3 == 1 else ".")
        (d / f"f{i:04d}.bin").write_bytes(rng.randbytes(rng.choice([0, 1, 100, 5000, 70000])))
    if big:
        (root / "big.bin").write_bytes(rng.randbytes(big))
    os.chmod(root / "sub" / "f0001.bin", 0o600) if (root / "sub" / "f0001.bin").exists() else None
    return root


def same_tree(a: Path, b: Path) -> bool:
    import filecmp

    cmp = filecmp.dircmp(a, b)

    def walk(c) -> bool:
        if c.left_only or c.right_only or c.diff_files or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        if mismatch or errors:
            return False
        return all(walk(sub) for sub in c.subdirs.values())

    return walk(cmp)


def expired_identity(home: Path, out: Path):
    """A certificate for "late" signed by ``home``'s CA that expired yesterday."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key((home / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((home / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "late")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))
    out.mkdir()
    (out / "node.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (out / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "ca.pem").write_bytes((home / "ca.pem").read_bytes())
    from agent.store.pki import load_identity

    return load_identity(out)
