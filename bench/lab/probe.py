"""UDP probes the self-check runs inside the lab's namespaces (a standalone script).

    probe.py echo  --bind ADDR:PORT --seconds T
    probe.py rtt   --to ADDR:PORT --count N --interval S
    probe.py sink  --bind ADDR:PORT --seconds T [--idle S]
    probe.py blast --to ADDR:PORT --rate BIT/S --size PAYLOAD --seconds T

Each prints one JSON object on stdout.  It imports nothing from the project, so it
runs under `ip netns exec` with any Python 3; it sends only to the address given.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time

HEADER = struct.Struct("!Qd")  # sequence number, sender's monotonic time
IP_UDP_OVERHEAD = 28
WINDOW_S = 0.1


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def echo(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(_addr(args.bind))
    sock.settimeout(0.2)
    end = time.monotonic() + args.seconds
    n = 0
    while time.monotonic() < end:
        try:
            data, peer = sock.recvfrom(65536)
        except TimeoutError:
            continue
        sock.sendto(data, peer)
        n += 1
    return {"echoed": n}


def rtt(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(_addr(args.to))
    sock.setblocking(False)
    sent: dict[int, float] = {}
    rtts: list[float] = []
    next_send = time.monotonic()
    seq = 0
    wait_after = max(1.0, args.interval * 4)
    end = None
    while True:
        now = time.monotonic()
        if seq < args.count and now >= next_send:
            sent[seq] = now
            sock.send(HEADER.pack(seq, now) + b"\0" * 32)
            seq += 1
            next_send += args.interval
            if seq == args.count:
                end = now + wait_after
        if end is not None and (now >= end or len(rtts) == args.count):
            break
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            time.sleep(0.0002)
            continue
        except ConnectionRefusedError:
            continue
        got, _ = HEADER.unpack_from(data)
        if got in sent:
            rtts.append(time.monotonic() - sent.pop(got))
    return {
        "sent": args.count,
        "received": len(rtts),
        "rtt_min_s": min(rtts) if rtts else None,
        "rtt_median_s": statistics.median(rtts) if rtts else None,
        "rtt_mean_s": statistics.fmean(rtts) if rtts else None,
        "rtt_max_s": max(rtts) if rtts else None,
    }


def sink(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    sock.bind(_addr(args.bind))
    sock.settimeout(0.05)
    print(json.dumps({"listening": True}), flush=True)
    end = time.monotonic() + args.seconds
    count = nbytes = 0
    first = last = None
    max_seq = -1
    windows: dict[int, int] = {}
    while True:
        now = time.monotonic()
        if now >= end or (last is not None and now - last > args.idle):
            break
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        last = time.monotonic()
        if first is None:
            first = last
        count += 1
        nbytes += len(data) + IP_UDP_OVERHEAD
        slot = int((last - first) / WINDOW_S)
        windows[slot] = windows.get(slot, 0) + len(data) + IP_UDP_OVERHEAD
        seq, _ = HEADER.unpack_from(data)
        max_seq = max(max_seq, seq)
    span = (last - first) if first is not None and last is not None else 0.0
    # Whole windows only (the last one is partial); empty windows count as zero.
    full = [windows.get(i, 0) * 8 / WINDOW_S for i in range(int(span / WINDOW_S))]
    return {
        "received": count,
        "ip_bytes": nbytes,
        "span_s": span,
        "max_seq": max_seq,
        "rate_bps": (nbytes - nbytes / count) * 8 / span if count > 1 and span > 0 else None,
        "rate_median_bps": statistics.median(full) if full else None,
        "windows": len(full),
    }


def blast(args: argparse.Namespace) -> dict:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
    sock.connect(_addr(args.to))
    payload = b"\0" * max(0, args.size - HEADER.size)
    interval = (args.size + IP_UDP_OVERHEAD) * 8 / args.rate
    start = time.monotonic()
    end = start + args.seconds
    seq = 0
    errors = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = int((now - start) / interval) + 1
        while seq < due:
            try:
                sock.send(HEADER.pack(seq, now) + payload)
            except (BlockingIOError, ConnectionRefusedError, OSError):
                errors += 1
            seq += 1
        time.sleep(0.0005)
    return {"sent": seq, "send_errors": errors, "seconds": time.monotonic() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("echo")
    p.add_argument("--bind", required=True)
    p.add_argument("--seconds", type=float, default=10)
    p = sub.add_parser("rtt")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.02)
    p = sub.add_parser("sink")
    p.add_argument("--bind", required=True)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--idle", type=float, default=1.0)
    p = sub.add_parser("blast")
    p.add_argument("--to", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--size", type=int, default=1472)
    p.add_argument("--seconds", type=float, default=2)
    args = parser.parse_args(argv)
    result = {"echo": echo, "rtt": rtt, "sink": sink, "blast": blast}[args.mode](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
