"""Prometheus metrics of ``dxa serve --metrics``: a scrape after a real copy; the sending agent's own
copies (``copy(metrics=...)``); rates that follow a paced copy every second; the TCP_INFO parser."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.aio.client import copy
from agent.aio.session import Progress
from agent.config import ServerConfig, TransferOptions, parse_host_port
from agent.errors import ConfigError
from agent.service.metrics import (
    TCP_INFO_LEN,
    ServerMetrics,
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


def test_sending_agent_counts_its_own_copies(tmp_path, identity):
    """A daemon's own copy (what its transfer jobs run: ``copy(..., metrics=its ServerMetrics)``, on
    its event loop) shows on its /metrics: sent bytes, an active ``send`` transfer with a rate while
    it runs, the RTT of the destination's data sockets; and a finished ``send`` transfer after."""
    sender = InProcessServer(tmp_path / "a", identity, metrics="127.0.0.1:0")
    dest = InProcessServer(tmp_path / "b", identity)
    try:
        metrics = sender.server.metrics
        metrics.interval = 0.2
        port = metrics.port
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "f.bin").write_bytes(b"s" * 4_000_000)
        opts = TransferOptions.for_test(rate=8 * 1_500_000, compress="off", streams=4, chunk_size=1 << 20)  # ~2.7 s
        job = asyncio.run_coroutine_threadsafe(
            copy([str(tmp_path / "src" / "f.bin")], dest.url("f.bin"), identity=identity, options=opts,
                 metrics=metrics, metrics_label="t1"), sender.loop)
        rate_key = ("dxa_transfer_rate_bytes_per_second", (("mode", "send"), ("peer", "node-a"), ("session", "t1")))
        seen = m = None
        deadline = time.monotonic() + 30
        while not job.done() and time.monotonic() < deadline:
            time.sleep(0.1)
            m = scrape(port)
            if m.get(rate_key, 0) > 0 and ("dxa_peer_rtt_seconds", (("peer", "node-a"),)) in m \
                    and m[("dxa_bytes_total", (("direction", "sent"),))] > 0:
                seen = m
                break
        res = job.result(60)
        assert res.verified
        assert seen is not None, f"never saw the running copy with a rate, sent bytes and an RTT: {m}"
        assert seen[("dxa_active_transfers", ())] == 1
        assert 0 < seen[rate_key] < 50_000_000
        assert 0 < seen[("dxa_peer_rtt_seconds", (("peer", "node-a"),))] < 1.0
        assert 0 < seen[("dxa_bytes_total", (("direction", "sent"),))] < res.bytes_sent
        assert seen[("dxa_bytes_total", (("direction", "received"),))] == 0
        end = settled(port, "send")
        assert end[("dxa_bytes_total", (("direction", "sent"),))] == res.bytes_sent >= 4_000_000
        assert end[("dxa_bytes_total", (("direction", "received"),))] == 0
        assert end[("dxa_files_completed_total", ())] == res.files_ok == 1
        assert ("dxa_peer_retransmits_total", (("peer", "node-a"),)) in end
        assert rate_key not in end
    finally:
        dest.close()
        sender.close()


def _rates(metrics: ServerMetrics) -> dict[str, float]:
    """Sample now; the per-transfer rate gauges by mode."""
    metrics.sample()
    return {s.labels["mode"]: s.value for fam in metrics.collect() for s in fam.samples
            if s.name == "dxa_transfer_rate_bytes_per_second"}


def test_rate_follows_a_paced_copy_every_second(tmp_path, identity):
    """8 Mbit/s over 4 streams in 1 MiB chunks: a chunk takes ~4 s to cross, yet the sender's and
    the receiver's rate gauges and the copy's ``Progress.bytes_moved`` read about the pace on each
    1-s sample (they count bytes per send/recv, not per chunk).  Samples are taken by hand, and
    judged loosely (most middle samples within 20%, none zero) for a loaded CI machine."""
    pace = 1_000_000  # bytes/s
    dest = InProcessServer(tmp_path / "b", identity)
    dest.server.metrics = received = ServerMetrics()  # hooks only: no endpoint, no sampler task
    sent = ServerMetrics()
    (tmp_path / "f.bin").write_bytes(os.urandom(6 << 20))
    opts = TransferOptions.for_test(rate=8 * pace, compress="off", streams=4, chunk_size=1 << 20)
    progress = Progress()

    async def main():
        task = asyncio.create_task(copy([str(tmp_path / "f.bin")], dest.url("f.bin"), identity=identity,
                                        options=opts, progress=progress, metrics=sent))
        samples = []
        last_t, last_moved = time.monotonic(), 0
        while not task.done():
            await asyncio.wait([task], timeout=1.0)
            if task.done():
                break
            now, moved = time.monotonic(), progress.bytes_moved
            b_rates = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_sample(received), dest.loop))
            samples.append((_rates(sent).get("send", 0.0), b_rates.get("push", 0.0),
                            (moved - last_moved) / (now - last_t), progress.bytes_done))
            last_t, last_moved = now, moved
        return await task, samples

    async def _sample(m):
        return _rates(m)

    try:
        res, samples = asyncio.run(main())
    finally:
        dest.close()
    assert res.verified and res.bytes_sent >= 6 << 20
    middle = samples[1:-1]  # the first and the last interval are partly idle
    assert len(middle) >= 3, samples
    for i, name in enumerate(("sender gauge", "receiver gauge", "progress.bytes_moved")):
        values = [s[i] for s in middle]
        near = [v for v in values if 0.8 * pace <= v <= 1.2 * pace]
        assert all(v > 0 for v in values), f"{name}: a 1-s sample read 0: {values}"
        assert len(near) * 2 > len(values), f"{name}: most 1-s samples should be within 20% of {pace}: {values}"
    assert progress.bytes_done == res.bytes_total  # verified bytes keep their meaning


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


def test_parse_host_port():
    assert parse_host_port("0.0.0.0:9400") == ("0.0.0.0", 9400)
    assert parse_host_port("[::1]:0") == ("::1", 0)
    for bad in ("9400", "host:", "host:x", ":80", "h:70000"):
        with pytest.raises(ConfigError, match="--metrics wants HOST:PORT"):
            parse_host_port(bad, "--metrics")


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
