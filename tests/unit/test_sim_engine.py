"""The simulated engine's scheduler, driven directly: what frees room wakes it, and a
shutdown abort ends every request."""

from __future__ import annotations

import asyncio

from workers.sim.engine import Engine, EngineConfig, Sequence_


async def drain(seq: Sequence_) -> list[int]:
    out = []
    while (token := await seq.out.get()) is not None:
        out.append(token)
    return out


async def test_aborting_the_head_of_the_queue_lets_the_next_request_in():
    engine = Engine(EngineConfig(num_blocks=8, block_size=4, speedup=1000))
    task = asyncio.create_task(engine.run())
    try:
        # A finished prefill keeps 5 of the 8 blocks (a lease): 3 stay free.
        lease = engine.submit("lease", list(range(1, 21)), 1, hold_blocks=True)
        await drain(lease)
        assert engine.cache.free_blocks == 3
        big = engine.submit("big", list(range(100, 120)), 4)  # needs 5 blocks: waits
        small = engine.submit("small", [7, 8, 9], 2)  # fits, but queues behind big
        await asyncio.sleep(0.05)
        assert big.state == small.state == "waiting"
        assert engine.abort("big")
        assert len(await asyncio.wait_for(drain(small), 2)) == 2
        assert small.finish_reason == "length"
        assert engine.release_lease("lease")
        assert engine.cache.free_blocks == 8
    finally:
        task.cancel()


async def test_abort_all_ends_waiting_and_running_requests_and_frees_their_blocks():
    engine = Engine(EngineConfig(num_blocks=16, block_size=4, speedup=0.05))
    task = asyncio.create_task(engine.run())
    try:
        running = engine.submit("a", list(range(1, 10)), 40)
        await asyncio.sleep(0.01)
        waiting = [engine.submit(f"w{i}", list(range(50 + i, 60 + i)), 40) for i in range(3)]
        assert engine.abort_all() == 4
        for seq in (running, *waiting):
            await asyncio.wait_for(drain(seq), 1)
            assert seq.finish_reason == "abort"
        assert engine.cache.free_blocks == 16 and engine.load == 0
        assert engine.abort_all() == 0
    finally:
        task.cancel()
