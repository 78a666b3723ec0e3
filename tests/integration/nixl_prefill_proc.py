"""A prefill engine's KV side (region + NIXL side channel + leases) in its own process, driven
over stdin, for the NIXL transfer tests.

Usage: ``python nixl_prefill_proc.py PORT ENGINE_ID NUM_BLOCKS BLOCK_BYTES BLOCK_SIZE``

It binds the side channel on 127.0.0.1:PORT (0: any free port), then answers each JSON
command line with one JSON line prefixed ``@@ `` (anything else on stdout is not a reply):

* ``{"op": "ready"}`` → ``{"port": P, "engine_id": E}`` (sent unasked at start);
* ``{"op": "fill", "slots": [[slot, hash], ...]}`` → ``{}``;
* ``{"op": "lease", "request_id": R, "block_ids": [...], "ttl": T}`` → ``{"expiry_time": X}``;
* ``{"op": "wait_ended", "timeout": T}`` → ``{"ended": [[R, block_ids, reason], ...]}``;
* ``{"op": "exit"}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

from workers.sim.kv_transfer import KvProducer, KvRegion


def reply(obj: dict) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main() -> None:
    port, engine_id = int(sys.argv[1]), sys.argv[2]
    num_blocks, block_bytes, block_size = map(int, sys.argv[3:6])
    region = KvRegion(num_blocks, block_bytes)
    producer = KvProducer(
        region, engine_id=engine_id, block_size=block_size, host="127.0.0.1", port=port
    )
    producer.start()
    reply({"port": producer.port, "engine_id": engine_id})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "fill":
                for slot, h in cmd["slots"]:
                    region.fill(slot, h)
                reply({})
            elif op == "lease":
                lease = producer.lease(cmd["request_id"], cmd["block_ids"], cmd.get("ttl"))
                reply({"expiry_time": lease.expiry_time})
            elif op == "wait_ended":
                ended = await producer.wait_ended(cmd["timeout"])
                reply({"ended": [[e.request_id, list(e.block_ids), e.reason] for e in ended]})
            elif op == "exit":
                break
    finally:
        await producer.close()
        region.close()


if __name__ == "__main__":
    asyncio.run(main())
