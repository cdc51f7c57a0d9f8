"""ReceiverStore's in-place (mmap) chunk path: what it maps, and what it refuses to map."""

from __future__ import annotations

import os

from agent.store.journal import Journal
from agent.store.receiving import ReceiverStore, part_name
from agent.store.safepath import SafeRoot
from agent.wire import ACTION_RESUME, ACTION_SEND, ManifestEntry, chunk_digest

CS = 256 << 10


def _store(tmp_path):
    root = SafeRoot(str(tmp_path / "root"))
    journal = Journal(str(tmp_path / "j.sqlite"))
    return ReceiverStore(root, journal), journal


def test_a_chunk_is_mapped_once_until_it_fails(tmp_path):
    store, journal = _store(tmp_path)
    e = ManifestEntry(0, "f.bin", "f", 3 * CS, 0o644, 1, CS)
    assert store.plan([e])[0].action == ACTION_SEND
    assert os.path.getsize(tmp_path / "root" / part_name("f.bin")) == 3 * CS  # sized up front
    m = store.map_chunk(0, CS, CS)
    m[:] = b"x" * CS
    m.close()
    # a duplicate of chunk 1 (verified or in flight) must not be decrypted in place
    assert store.map_chunk(0, CS, CS) is None
    store.map_failed(0, CS)
    m = store.map_chunk(0, CS, CS)  # after a failed check it may be mapped again
    assert m is not None
    m.close()
    assert store.map_chunk(0, 100, CS) is None  # not page aligned: the pwrite path
    assert store.map_chunk(0, 2 * CS, 4096) is None  # small: the pwrite path
    store.close()
    journal.close()


def test_resumed_chunks_are_never_mapped(tmp_path):
    store, journal = _store(tmp_path)
    e = ManifestEntry(0, "f.bin", "f", 2 * CS, 0o644, 1, CS)
    store.plan([e])
    store.write_chunk(0, 0, b"a" * CS)
    store.record(0, 0, chunk_digest(b"a" * CS))
    store.close()
    store2 = ReceiverStore(SafeRoot(str(tmp_path / "root")), journal)
    plan = store2.plan([e])[0]
    assert plan.action == ACTION_RESUME and [i for i, _ in plan.have] == [0]
    assert store2.map_chunk(0, 0, CS) is None  # verified in the last run: only via a private buffer
    assert store2.map_chunk(0, CS, CS) is not None
    store2.close()
    journal.close()
