"""Errors a user sees from ``dxa cp``: what answered on a wrong port, a connection that never
started, a usage error on the server's side, no server path in a message, and one JSON
object on every exit of ``--json``, with a rate computed from what moved."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from tests.conftest import InProcessServer, dxa, make_tree


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_json(out: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_the_metrics_port_is_named_as_http_not_an_authentication_failure(tmp_path, identity, home):
    srv = InProcessServer(tmp_path / "root", identity, metrics="127.0.0.1:0")
    try:
        r = dxa(home, "cp", "--json", f"dxa://127.0.0.1:{srv.server.metrics.port}/x", str(tmp_path / "o"))
    finally:
        srv.close()
    assert r.returncode == 2, r.stderr
    assert "HTTP server" in r.stderr and "authentication" not in r.stderr
    assert _one_json(r.stdout) == {"ok": False, "exit": 2, "error": r.stderr.strip().removeprefix("dxa: ")}


def test_the_grpc_port_is_named_as_grpc(tmp_path, identity, home):
    from agent.service.grpc_server import start_daemon_service, stop_daemon_service

    srv = InProcessServer(tmp_path / "root", identity)
    grpc_server, manager = asyncio.run_coroutine_threadsafe(start_daemon_service(
        "127.0.0.1:0", str(srv.root), str(tmp_path / "t.sqlite"), identity), srv.loop).result(20)
    try:
        r = dxa(home, "cp", "--json", f"dxa://127.0.0.1:{grpc_server.port}/x", str(tmp_path / "o"))
    finally:
        asyncio.run_coroutine_threadsafe(stop_daemon_service(grpc_server, manager), srv.loop).result(20)
        srv.close()
    assert r.returncode == 2, r.stderr
    assert "gRPC/HTTP2 server" in r.stderr and "authentication" not in r.stderr
    assert _one_json(r.stdout)["exit"] == 2


@pytest.mark.parametrize("where", ["nothing-listening", "unknown-host"])
def test_a_connection_that_never_started_offers_no_resume(tmp_path, home, where):
    url = (f"dxa://127.0.0.1:{_free_port()}/x" if where == "nothing-listening"
           else "dxa://no-such-host.invalid:7400/x")
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 100)
    for args in (["cp", "--json", str(src), url], ["cp", "--json", url, str(tmp_path / "o")]):
        r = dxa(home, *args)
        assert r.returncode == 4, r.stderr
        assert "resume" not in r.stderr and "nothing was copied" in r.stderr
        out = _one_json(r.stdout)
        assert out["ok"] is False and out["exit"] == 4 and "cannot connect" in out["error"]


def test_a_file_pushed_onto_an_existing_remote_directory_is_a_usage_error(tmp_path, server, home):
    (server.root / "dirx" / "inside").mkdir(parents=True)
    src = tmp_path / "f.txt"
    src.write_text("hi\n")
    r = dxa(home, "cp", "--json", str(src), server.url("dirx"))
    assert r.returncode == 2, r.stderr
    assert "is a directory" in r.stderr and "end the destination with /" in r.stderr
    assert _one_json(r.stdout)["exit"] == 2
    assert sorted(p.name for p in (server.root / "dirx").iterdir()) == ["inside"]
    # with the trailing slash it goes in
    r = dxa(home, "cp", "--json", str(src), server.url("dirx/"))
    assert r.returncode == 0, r.stderr
    assert (server.root / "dirx" / "f.txt").read_text() == "hi\n"


def test_a_pull_error_does_not_reveal_where_the_server_root_is(tmp_path, server, home):
    make_tree(server.root / "datasets" / "x", files=3)
    r = dxa(home, "cp", "--json", server.url("datasets/x"), str(tmp_path / "o"))  # a directory without -r
    assert r.returncode == 2, r.stderr
    assert "use -r" in r.stderr and "datasets/x" in r.stderr
    for where in {str(server.root), os.path.realpath(server.root), str(tmp_path)}:
        assert where not in r.stderr and where not in r.stdout


def test_a_refused_copy_that_sent_nothing_reports_no_rate(tmp_path, server, home):
    # every file of the tree lands on a directory that is already there: all refused
    src = tmp_path / "t"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
        (server.root / "t" / f"f{i}").mkdir(parents=True)
    r = dxa(home, "cp", "-r", "--json", str(src), server.url("t"))
    assert r.returncode == 1, r.stderr
    out = _one_json(r.stdout)
    assert out["ok"] is False and out["exit"] == 1 and out["files_failed"] == 3 and "is a directory" in out["error"]
    assert out["bytes_sent"] == 0 and out["bytes_delivered"] == 0 and out["gbps"] == 0


def test_a_verified_copy_reports_ok_and_a_rate_from_what_it_delivered(tmp_path, server, home):
    src = make_tree(tmp_path / "src", files=6, big=300_000)
    r = dxa(home, "cp", "-r", "--json", "--compress", "off", str(src), server.url("d"))
    assert r.returncode == 0, r.stderr
    out = _one_json(r.stdout)
    assert out["ok"] is True and out["exit"] == 0 and "error" not in out
    assert out["bytes_delivered"] == out["bytes_total"] > 0
    assert out["gbps"] == pytest.approx(out["bytes_delivered"] * 8 / out["seconds"] / 1e9, rel=0.01)
    again = _one_json(dxa(home, "cp", "-r", "--json", str(src), server.url("d")).stdout)
    assert again["ok"] and again["bytes_sent"] == 0 and again["gbps"] == 0


@pytest.mark.root
def test_a_local_disk_full_prints_its_json_object_too(tmp_path, server, home):
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        (server.root / "big.bin").write_bytes(os.urandom(8 << 20))
        r = dxa(home, "cp", "--json", "--compress", "off", server.url("big.bin"), str(mnt / "b"))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
    assert r.returncode == 5, r.stderr
    out = _one_json(r.stdout)
    assert out["ok"] is False and out["exit"] == 5 and "space" in out["error"]


def test_the_exit_statuses_in_the_readme_and_help_are_the_codes():
    from agent.cli import main
    from tests.conftest import REPO

    text = (REPO / "README.md").read_text()
    for code in (main.EXIT_OK, main.EXIT_INCOMPLETE, main.EXIT_USAGE, main.EXIT_AUTH, main.EXIT_NETWORK,
                 main.EXIT_STORAGE, main.EXIT_INTERRUPTED):
        assert f"{code} " in main.EPILOG and f"{code} " in text.split("Exit status:", 1)[1][:700], code
    assert main.EXIT_INTERRUPTED == 130
