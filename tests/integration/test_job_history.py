"""The agent's finished jobs are pruned past their retention and ListTransfers pages
(issue 13, "exposed state").  The jobs are written straight into transfers.sqlite (no
copy runs); the retention's clock is injected."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agent.service.client import Client
from agent.service.credentials import GrpcCallError
from agent.service.grpc_server import TransferServer
from agent.service.transfers import JobManager, JobState, JobStore, Transfer, TransferSpec

DAY = 86400.0
T0 = 1_800_000_000.0


def _history(db: str) -> list[str]:
    """Jobs t1..t9: t1-t6 finished 10 days before T0, t7-t8 finished at T0, t9 still queued from long ago."""
    store = JobStore(db)
    ids = []
    for i in range(9):
        at = T0 - 10 * DAY if i < 6 or i == 8 else T0
        state = JobState.SUBMITTED if i == 8 else (JobState.DONE, JobState.FAILED, JobState.CANCELLED)[i % 3]
        t = Transfer("", TransferSpec(f"f{i}", "dxa://h:1/x"), state, created=at, updated=at)
        ids.append(store.insert(t))
    store.close()
    return ids


async def _ids(m: JobManager) -> list[str]:
    return [t.id for t in m.list()]


def test_finished_jobs_older_than_the_retention_go_at_start_and_unfinished_ones_stay(tmp_path, identity):
    db = str(tmp_path / "transfers.sqlite")
    ids = _history(db)
    (tmp_path / "root").mkdir()

    async def main():
        clock = [T0 + DAY]
        m = JobManager(str(tmp_path / "root"), db, identity, history_retention=7 * DAY, clock=lambda: clock[0],
                       prune_interval=3600)
        m._launch = lambda t: None  # t9 stays queued: running it is not this test's subject
        await m.start()
        after_start = await _ids(m)
        clock[0] = T0 + 8 * DAY  # t7, t8 now past a week too
        pruned = m.prune_history()
        after = await _ids(m)
        await m.close()
        return after_start, pruned, after, [t.id for t in JobStore(db).load()]

    after_start, pruned, after, on_disk = asyncio.run(main())
    assert after_start == ids[6:]
    assert pruned == 2 and after == on_disk == [ids[8]]  # the unfinished one is never pruned


def test_list_transfers_pages_without_gaps_or_repeats_and_refuses_a_bad_token(tmp_path, identity):
    db = str(tmp_path / "transfers.sqlite")
    ids = _history(db)
    (tmp_path / "root").mkdir()

    async def main():
        m = JobManager(str(tmp_path / "root"), db, identity)
        m._launch = lambda t: None
        await m.start()
        server = TransferServer(m, identity)
        port = await server.start()
        try:
            async with Client(f"127.0.0.1:{port}", identity) as c:
                pages, token = [], ""
                while True:
                    got, token = await c.list_page(page_size=4, page_token=token)
                    pages.append([t.id for t in got])
                    if not token:
                        break
                everything = [t.id for t in await c.list()]
                done = [t.id for t in await c.list([JobState.DONE])]
                with pytest.raises(GrpcCallError) as bad:
                    await c.list_page(page_token="bm9wZQ")
        finally:
            await server.stop()
            await m.close()
        return pages, everything, done, bad.value

    pages, everything, done, bad = asyncio.run(main())
    assert [len(p) for p in pages] == [4, 4, 1] and sum(pages, []) == ids == everything
    assert done == [ids[0], ids[3], ids[6]]
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "page token" in str(bad), bad
