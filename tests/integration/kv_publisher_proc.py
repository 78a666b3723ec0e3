"""A worker's KV event publisher in its own process, driven over stdin, for subscriber tests.

Usage: ``python kv_publisher_proc.py ENDPOINT REPLAY_ENDPOINT|- SEED [BLOCK_SIZE]``

It binds (vLLM's rule), prints ``ready <endpoint> <replay endpoint>``, then reads one JSON
command per line and answers each with ``done <next seq>``:

* ``{"op": "publish", "count": N, "drop": [seq, ...]}``: publish the next N batches of
  :func:`eventgen.batches`; batches whose seq is in ``drop`` are kept for replay but not
  sent, as if the network had lost them;
* ``{"op": "restart", "seed": S}``: behave like a restarted engine (seq from 0, empty replay
  buffer, a fresh cache generating from seed S);
* ``{"op": "exit"}``.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import eventgen

from epp.kvevents.publisher import ZmqEventPublisher


def main() -> None:
    endpoint, replay, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    block_size = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    pub = ZmqEventPublisher(endpoint, None if replay == "-" else replay, buffer_steps=100_000)
    gen = eventgen.batches(seed, block_size=block_size)
    print(f"ready {pub.endpoint} {pub.replay_endpoint or '-'}", flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "publish":
            drop = set(cmd.get("drop", ()))
            for _ in range(cmd["count"]):
                pub.publish_events(next(gen), send=pub.next_seq not in drop)
        elif op == "restart":
            pub.restart()
            gen = eventgen.batches(cmd["seed"], block_size=block_size)
        elif op == "exit":
            break
        print(f"done {pub.next_seq}", flush=True)
    pub.close()


if __name__ == "__main__":
    main()
