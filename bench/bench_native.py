#!/usr/bin/env python3
"""Native (Cython) vs pure-Python twins: header pack/parse and ChunkMap bookkeeping.

    python setup.py build_ext --inplace      # build agent._native._frames / _chunkmap
    python bench/bench_native.py             # markdown table (~20-40 s on 2 cores)
    python bench/bench_native.py --quick     # 10x fewer ops, a few seconds
    python bench/bench_native.py --json      # machine-readable

Every figure is ops/s as a Python caller sees it (call overhead and loop
included), best of ``--repeat`` runs.  The second table puts the per-chunk cost of
these functions next to AES-GCM over the same bytes, for a 1 GiB transfer, so that
the speedup is not mistaken for a transfer speedup: see bench/NATIVE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent._native import _chunkmap_py, _frames_py

try:
    from agent._native import _chunkmap as _chunkmap_c
    from agent._native import _frames as _frames_c
except ImportError:  # not built: python columns only
    _chunkmap_c = _frames_c = None

from agent._native import parse_data_header as _facade_parse

GIB = 1 << 30
MIB = 1 << 20


def best_of(repeat: int, fn) -> float:
    """Smallest wall time of ``repeat`` runs of fn() (process is single-threaded)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------ the cases
# Each case: (name, ops per run, description, factory(frames_mod, chunkmap_mod) -> callable)

SID, NONCE, DIGEST = os.urandom(8), os.urandom(12), os.urandom(32)


def case_pack(n):
    def make(fr, _cm):
        pack = fr.pack_data_header

        def run(sid=SID, nonce=NONCE, digest=DIGEST, plain=4 * MIB, length=4 * MIB + 92):
            for i in range(n):
                pack(1, sid, 3, i, i << 22, plain, nonce, digest, length)
        return run
    return make


def case_parse(n, wrap):
    def make(fr, _cm):
        parse = fr.parse_data_header
        hdr = wrap(_frames_py.pack_data_header(1, SID, 3, 77, 77 << 22, 4 * MIB, NONCE, DIGEST, 4 * MIB + 92)
                   + b"\0" * 64)

        def run():
            for _ in range(n):
                parse(hdr)
        return run
    return make


def case_prefix(n):
    def make(fr, _cm):
        parse = fr.parse_prefix
        pre = _frames_py.pack_data_header(1, SID, 3, 77, 0, 4 * MIB, NONCE, DIGEST, 4 * MIB + 92)[:8]

        def run():
            for _ in range(n):
                parse(pre)
        return run
    return make


def case_codec(n):
    """The caller as it is: agent.wire decode_data_header = parse + checks + a frozen DataHeader."""
    def make(fr, _cm):
        import agent.wire._codec as codec

        hdr = codec.encode_data_header(1, SID, 3, 77, 77 << 22, 4 * MIB, NONCE, DIGEST, 4 * MIB)
        decode = codec.decode_data_header

        def run():
            codec.parse_data_header = fr.parse_data_header  # the facade's binding, swapped per side
            try:
                for _ in range(n):
                    decode(hdr)
            finally:
                codec.parse_data_header = _facade_parse
        return run
    return make


def case_add(n):
    """One ack per chunk of a 1M-chunk file, in order (shuffled order is the lifecycle case:
    shuffling a 1M-int list would time cache misses on the int objects, not the map)."""
    def make(_fr, cm):
        def run():
            add = cm.ChunkMap(n).add
            for i in range(n):
                add(i)
        return run
    return make


def case_contains(n):
    def make(_fr, cm):
        m = cm.ChunkMap(n)
        for i in range(0, n, 3):
            m.add(i)

        def run():
            for i in range(n):
                i in m  # noqa: B015
        return run
    return make


def case_missing(chunks, done_fraction, calls):
    rng = random.Random(2)
    marked = [i for i in range(chunks) if rng.random() < done_fraction]

    def make(_fr, cm):
        m = cm.ChunkMap(chunks)
        for i in marked:
            m.add(i)

        def run():
            for _ in range(calls):
                m.missing()
        return run
    return make


def case_big_file(files, chunks=512):
    """A 2 GiB file at 4 MiB chunks: map, 512 acks out of order, done check, resume query."""
    order = list(range(chunks))
    random.Random(3).shuffle(order)

    def make(_fr, cm):
        def run():
            for _ in range(files):
                m = cm.ChunkMap(chunks)
                add = m.add
                for i in order:
                    add(i)
                m.complete()
                m.missing()
        return run
    return make


def case_small_files(files):
    """10,000 one-chunk files: map, one ack, done check each."""
    def make(_fr, cm):
        def run():
            for _ in range(files // 10_000):
                for _f in range(10_000):
                    m = cm.ChunkMap(1)
                    m.add(0)
                    m.complete()
        return run
    return make


def cases(scale: float):
    n = max(10_000, int(1_000_000 * scale))
    return [
        ("pack_data_header", n, "84-byte DATA header", case_pack(n)),
        ("parse_data_header(bytes)", n, "", case_parse(n, bytes)),
        ("parse_data_header(memoryview)", n, "slice of a receive buffer", case_parse(n, memoryview)),
        ("parse_prefix", n, "8-byte prefix", case_prefix(n)),
        ("wire decode_data_header", n // 2, "codec wrapper: parse + checks + frozen dataclass", case_codec(n // 2)),
        ("ChunkMap.add", n, f"{n:,}-chunk map, each chunk once", case_add(n)),
        ("`i in ChunkMap`", n, "", case_contains(n)),
        ("ChunkMap.missing() 512 chunks", max(200, int(20_000 * scale)),
         "2 GiB @ 4 MiB, half done", case_missing(512, 0.5, max(200, int(20_000 * scale)))),
        ("ChunkMap.missing() 1M chunks", max(2, int(20 * scale)),
         "1,048,576 chunks, 99% done", case_missing(1 << 20, 0.99, max(2, int(20 * scale)))),
        ("2 GiB file lifecycle", max(100, int(2_000 * scale)),
         "new map + 512 add + complete + missing", case_big_file(max(100, int(2_000 * scale)))),
        ("10,000 small files", max(10_000, int(100_000 * scale)) // 10_000 * 10_000,
         "per file: new map + add + complete", case_small_files(max(10_000, int(100_000 * scale)))),
    ]


def run_cases(scale: float, repeat: int) -> list[dict]:
    rows = []
    for name, ops, desc, make in cases(scale):
        row = {"name": name, "ops": ops, "what": desc}
        py_run = make(_frames_py, _chunkmap_py)
        c_run = make(_frames_c, _chunkmap_c) if _frames_c is not None else None
        t_py = t_c = float("inf")
        for _ in range(repeat):  # interleaved, so a noisy neighbour hits both sides alike
            t_py = min(t_py, best_of(1, py_run))
            if c_run is not None:
                t_c = min(t_c, best_of(1, c_run))
        row["python_ops_s"] = ops / t_py
        row["python_ns_op"] = t_py / ops * 1e9
        if c_run is not None:
            row["native_ops_s"] = ops / t_c
            row["native_ns_op"] = t_c / ops * 1e9
            row["speedup"] = t_py / t_c
        rows.append(row)
    return rows


# ------------------------------------------------------------ share of a transfer

def crypto_seconds_per_gib(chunk: int, sample_bytes: int, repeat: int) -> dict:
    """AES-256-GCM seal and open (and BLAKE3, if installed) of 1 GiB, extrapolated."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead = AESGCM(AESGCM.generate_key(bit_length=256))
    data = os.urandom(chunk)
    aad = b"\0" * 84
    k = max(1, sample_bytes // chunk)
    sealed = aead.encrypt(NONCE, data, aad)

    def seal():
        for _ in range(k):
            aead.encrypt(NONCE, data, aad)

    def open_():
        for _ in range(k):
            aead.decrypt(NONCE, sealed, aad)

    scale = GIB / (k * chunk)
    out = {"seal_s": best_of(repeat, seal) * scale, "open_s": best_of(repeat, open_) * scale}
    try:
        import blake3
    except ImportError:
        return out

    def digest():
        for _ in range(k):
            blake3.blake3(data).digest()

    out["blake3_s"] = best_of(repeat, digest) * scale  # once per side in the real pipeline
    return out


def transfer_share(rows: list[dict], repeat: int, sample_bytes: int) -> list[dict]:
    """Per chunk both ends pay: pack (sender), prefix + header parse (receiver), add (each side)."""
    ns = {r["name"]: r for r in rows}
    per_chunk = {}
    for impl in ("python", "native"):
        key = f"{impl}_ns_op"
        if key not in ns["pack_data_header"]:
            continue
        per_chunk[impl] = (
            ns["pack_data_header"][key]
            + ns["parse_prefix"][key]
            + ns["parse_data_header(memoryview)"][key]
            + 2 * ns["ChunkMap.add"][key]
        ) * 1e-9
    out = []
    for chunk in (4 * MIB, 1 * MIB, 256 * 1024, 64 * 1024):
        chunks = GIB // chunk
        crypto = crypto_seconds_per_gib(chunk, sample_bytes, repeat)
        aes = crypto["seal_s"] + crypto["open_s"]
        row = {"chunk": chunk, "chunks": chunks, "aesgcm_seal_open_s": aes}
        if "blake3_s" in crypto:
            row["blake3_both_ends_s"] = 2 * crypto["blake3_s"]
        for impl, sec in per_chunk.items():
            total = sec * chunks
            row[f"{impl}_s"] = total
            row[f"{impl}_share_of_aes"] = total / (total + aes)
        out.append(row)
    return out


# ------------------------------------------------------------ output

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "—"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.1f}"


def fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def markdown(result: dict) -> str:
    lines = [
        (
            f"Python {result['python']} on {result['cpu']} ({result['cores']} cores, shared); "
            f"best of {result['repeat']}, scale {result['scale']}"
        ),
        "",
        "| operation | ops | python ops/s | native ops/s | speedup | python ns/op | native ns/op |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["cases"]:
        name = r["name"] + (f" ({r['what']})" if r["what"] else "")
        lines.append(
            f"| {name} | {r['ops']:,} | {fmt_rate(r['python_ops_s'])} | {fmt_rate(r.get('native_ops_s'))} | "
            + (f"{r['speedup']:.1f}x" if "speedup" in r else "—")
            + f" | {r['python_ns_op']:.0f} | "
            + (f"{r['native_ns_op']:.0f}" if "native_ns_op" in r else "—")
            + " |"
        )
    if result.get("share"):
        has_b3 = "blake3_both_ends_s" in result["share"][0]
        lines += [
            "",
            "Share of a 1 GiB encrypted transfer's CPU (per chunk: pack + prefix + header parse + "
            "2 x add; AES-256-GCM seal + open of the same bytes"
            + ("; BLAKE3 shown for scale, not in the share" if has_b3 else "") + "):",
            "",
            "| chunk | chunks/GiB | AES-GCM seal+open | "
            + ("BLAKE3 x2 | " if has_b3 else "")
            + "python bookkeeping | share | native bookkeeping | share | saved per GiB |",
            "|---:|---:|---:|" + ("---:|" if has_b3 else "") + "---:|---:|---:|---:|---:|",
        ]
        for s in result["share"]:
            nat = "native_s" in s
            lines.append(
                f"| {s['chunk'] // 1024} KiB | {s['chunks']:,} | {fmt_time(s['aesgcm_seal_open_s'])} | "
                + (f"{fmt_time(s['blake3_both_ends_s'])} | " if has_b3 else "")
                + f"{fmt_time(s['python_s'])} | {s['python_share_of_aes']:.3%} | "
                + (f"{fmt_time(s['native_s'])} | {s['native_share_of_aes']:.3%} | "
                   f"{fmt_time(s['python_s'] - s['native_s'])} |" if nat else "— | — | — |")
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    ap.add_argument("--quick", action="store_true", help="10x fewer operations")
    ap.add_argument("--repeat", type=int, default=5, help="runs per measurement, best kept (default 5)")
    ap.add_argument("--no-share", action="store_true", help="skip the AES-GCM comparison")
    args = ap.parse_args(argv)
    scale = 0.1 if args.quick else 1.0
    t0 = time.perf_counter()
    rows = run_cases(scale, args.repeat)
    share = [] if args.no_share else transfer_share(rows, args.repeat, int(64 * MIB * scale) or MIB)
    result = {
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "native_built": _frames_c is not None,
        "repeat": args.repeat,
        "scale": scale,
        "cases": rows,
        "share": share,
        "elapsed_s": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        if _frames_c is None:
            print("native modules not built (python setup.py build_ext --inplace): python only\n")
        print(markdown(result))
        print(f"\n({result['elapsed_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
