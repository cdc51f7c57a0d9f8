"""Prometheus metrics of ``dxa serve --metrics``: a scrape after a real copy; the TCP_INFO parser."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.aio.client import copy
from agent.config import ServerConfig, TransferOptions
from agent.errors import ConfigError
from agent.service.metrics import (
    TCP_INFO_LEN,
    parse_listen,
    parse_tcp_info,
    read_tcp_info,
)
from tests.conftest import InProcessServer, make_tree, same_tree

OPTS = TransferOptions.for_test(recursive=True)


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def settled(port: int, mode: str, count: int = 1, timeout: float = 10.0) -> dict[tuple, float]:
    """Scrape once the daemon has closed the books on its last ``mode`` session: the
    client returns on SUMMARY, a moment before the server's own end-of-session accounting."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(port)
        if m.get(("dxa_transfers_total", (("mode", mode), ("outcome", "ok")))) == count \
                and m.get(("dxa_active_transfers", ())) == 0:
            return m
        assert time.monotonic() < deadline, f"session accounting never settled: {m}"
        time.sleep(0.02)


@pytest.fixture
def metrics_server(tmp_path, identity):
    srv = InProcessServer(tmp_path / "root", identity, metrics="127.0.0.1:0")
    yield srv
    srv.close()


def test_scrape_after_push_and_pull(tmp_path, metrics_server, identity):
    srv = metrics_server
    port = srv.server.metrics.port
    assert port > 0
    before = scrape(port)
    assert before[("dxa_active_transfers", ())] == 0
    assert before[("dxa_bytes_total", (("direction", "received"),))] == 0
    assert before[("dxa_files_completed_total", ())] == 0

    src = make_tree(tmp_path / "src", files=12, big=600_000)
    res = asyncio.run(copy([str(src)], srv.url("d"), identity=identity, options=OPTS))
    assert res.verified and same_tree(src, srv.root / "d")
    after = settled(port, "push")
    assert after[("dxa_active_transfers", ())] == 0
    assert after[("dxa_bytes_total", (("direction", "received"),))] == res.bytes_sent > 600_000
    assert after[("dxa_files_completed_total", ())] == res.files_ok > 0
    assert after[("dxa_files_failed_total", ())] == 0
    assert after[("dxa_chunks_retried_total", ())] == 0
    assert after[("dxa_transfers_total", (("mode", "push"), ("outcome", "ok")))] == 1
    assert not any(name == "dxa_transfer_rate_bytes_per_second" for name, _ in after)  # gone with the session
    assert ("dxa_peer_retransmits_total", (("peer", "node-a"),)) in after

    out = tmp_path / "out"
    res = asyncio.run(copy([srv.url("d")], str(out), identity=identity, options=OPTS))
    assert res.verified
    after2 = settled(port, "pull")
    assert after2[("dxa_bytes_total", (("direction", "sent"),))] == res.bytes_sent > 600_000
    assert after2[("dxa_bytes_total", (("direction", "received"),))] == after[("dxa_bytes_total", (("direction", "received"),))]
    assert after2[("dxa_transfers_total", (("mode", "pull"), ("outcome", "ok")))] == 1
    assert after2[("dxa_active_transfers", ())] == 0


def test_live_transfer_shows_rate_rtt_and_active(tmp_path, metrics_server, identity):
    """Sample while a paced push is running: active=1, a rate for its session, an RTT for the
    peer, bytes and finished files counted before the transfer ends."""
    srv = metrics_server
    srv.server.metrics.interval = 0.2
    port = srv.server.metrics.port
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.bin").write_bytes(b"x" * 4_500_000)
    for i in range(6):
        (tmp_path / "src" / f"small{i}.bin").write_bytes(b"y" * 1000)
    opts = TransferOptions.for_test(recursive=True, rate=8 * 1_500_000, compress="off")  # ~3 s

    async def main():
        task = asyncio.create_task(copy([str(tmp_path / "src")], srv.url("paced"), identity=identity, options=opts))
        seen = m = None
        for _ in range(80):
            await asyncio.sleep(0.1)
            m = await asyncio.to_thread(scrape, port)
            rates = [v for (name, _), v in m.items() if name == "dxa_transfer_rate_bytes_per_second"]
            rtts = [v for (name, _), v in m.items() if name == "dxa_peer_rtt_seconds"]
            if rates and rates[0] > 0 and rtts and m[("dxa_files_completed_total", ())] > 0:
                seen = m, rates[0], rtts[0]
                break
            if task.done():
                break
        res = await task
        return seen, m, res

    seen, last, res = asyncio.run(main())
    assert res.verified
    assert seen is not None, f"never saw a live rate, an RTT and a finished file: {last}"
    m, rate, rtt = seen
    assert m[("dxa_active_transfers", ())] == 1
    assert 0 < m[("dxa_bytes_total", (("direction", "received"),))] < res.bytes_sent
    assert 0 < m[("dxa_files_completed_total", ())] < res.files_ok == 8  # 7 files and their directory
    assert 0 < rate < 50_000_000
    assert 0 < rtt < 1.0
    end = settled(port, "push")
    assert end[("dxa_active_transfers", ())] == 0
    assert end[("dxa_files_completed_total", ())] == 8
    assert end[("dxa_bytes_total", (("direction", "received"),))] == res.bytes_sent


def test_two_servers_have_separate_registries(tmp_path, identity):
    a = InProcessServer(tmp_path / "a", identity, metrics="127.0.0.1:0")
    b = InProcessServer(tmp_path / "b", identity, metrics="127.0.0.1:0")
    try:
        assert a.server.metrics.port != b.server.metrics.port
        assert a.server.metrics.registry is not b.server.metrics.registry
        src = make_tree(tmp_path / "src", files=3)
        asyncio.run(copy([str(src)], a.url("x"), identity=identity, options=OPTS))
        assert settled(a.server.metrics.port, "push")[("dxa_transfers_total", (("mode", "push"), ("outcome", "ok")))] == 1
        assert ("dxa_transfers_total", (("mode", "push"), ("outcome", "ok"))) not in scrape(b.server.metrics.port)
    finally:
        a.close()
        b.close()


def test_metrics_off_by_default(server):
    assert server.server.metrics is None


def test_bad_metrics_address_is_a_config_error(tmp_path, identity):
    from agent.aio.server import Server

    async def main():
        s = Server(ServerConfig.for_test(str(tmp_path / "r"), metrics="nonsense"), identity)
        with pytest.raises(ConfigError):
            await s.start()

    asyncio.run(main())


def test_parse_listen():
    assert parse_listen("0.0.0.0:9400") == ("0.0.0.0", 9400)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9400", "host:", "host:x", ":80", "h:70000"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def _packed_tcp_info(rtt: int, rttvar: int, total_retrans: int) -> bytes:
    # struct tcp_info (linux/tcp.h): 8 u8 fields, then u32s; tcpi_rtt at byte 68,
    # tcpi_rttvar at 72, tcpi_total_retrans at 100; the kernel returns up to 232 bytes
    u8 = (1, 0, 0, 0, 0, 7, 0x77, 0)  # state ESTABLISHED, options, wscales
    u32 = [0] * 24
    u32[0] = 204_000      # tcpi_rto
    u32[2] = 1448         # tcpi_snd_mss
    u32[7] = 3            # tcpi_retrans (currently unacked retransmits, not the total)
    u32[15] = rtt
    u32[16] = rttvar
    u32[23] = total_retrans
    buf = struct.pack("=8B24I", *u8, *u32)
    assert struct.unpack_from("=I", buf, 68)[0] == rtt and struct.unpack_from("=I", buf, 100)[0] == total_retrans
    return buf + b"\xee" * (TCP_INFO_LEN - len(buf))


def test_parse_tcp_info_from_packed_struct():
    info = parse_tcp_info(_packed_tcp_info(rtt=20_345, rttvar=1_200, total_retrans=17))
    assert (info.rtt_us, info.rttvar_us, info.total_retrans) == (20_345, 1_200, 17)
    info = parse_tcp_info(_packed_tcp_info(rtt=0xFFFFFFFF, rttvar=0, total_retrans=0)[:104])
    assert info.rtt_us == 0xFFFFFFFF and info.total_retrans == 0
    with pytest.raises(ValueError):
        parse_tcp_info(b"\0" * 100)


@pytest.mark.skipif(not hasattr(socket, "TCP_INFO"), reason="TCP_INFO is Linux-only")
def test_read_tcp_info_of_a_live_socket():
    lsn = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(lsn.getsockname())
    s, _ = lsn.accept()
    try:
        c.sendall(b"x" * 100_000)
        s.recv(100_000)
        info = read_tcp_info(c)
        assert info is not None and 0 < info.rtt_us < 1_000_000 and info.total_retrans == 0
    finally:
        for x in (c, s, lsn):
            x.close()
    assert read_tcp_info(c) is None  # closed: no exception


def test_daemon_reads_metrics_from_the_config_file(tmp_path, home, daemon_factory):
    import re
    import time

    (home / "config.toml").write_text('[serve]\nmetrics = "127.0.0.1:0"\n')
    d = daemon_factory()
    deadline = time.monotonic() + 10
    while not (m := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", d.log_path.read_text())):
        assert time.monotonic() < deadline, d.log_path.read_text()
        time.sleep(0.05)
    assert scrape(int(m.group(1)))[("dxa_active_transfers", ())] == 0


def test_an_address_in_use_is_a_listen_error(tmp_path, identity):
    import socket

    from agent.aio.server import Server
    from agent.errors import ListenError
    from agent.service.grpc_server import GrpcListenError

    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]

    async def main():
        for kw in ({"port": port}, {"metrics": f"127.0.0.1:{port}"}):
            s = Server(ServerConfig.for_test(str(tmp_path / "r"), **kw), identity)
            with pytest.raises(ListenError, match="in use"):
                await s.start()

    try:
        asyncio.run(main())
    finally:
        busy.close()
    assert issubclass(GrpcListenError, ListenError)  # dxa serve exits 4 on each of them
