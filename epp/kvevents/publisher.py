"""A KV event publisher that behaves on the wire exactly like vLLM's ``ZmqEventPublisher``.

kvpick's simulated engine publishes with it, and tests use it as the engine side of the
event plane. On the wire (specs/kv-events.md §1, §1.4):

* a PUB socket sends ``[topic, seq (8 bytes big-endian), payload]``; ``seq`` starts at 0 and
  grows by one per batch; the PUB high-water mark is ``hwm``;
* an optional ROUTER socket at ``replay_endpoint`` keeps the last ``buffer_steps`` batches
  and answers a request ``[b"", start_seq]`` with every buffered batch whose seq is at least
  ``start_seq``, then the end marker (seq -1, empty payload). With ``replay_topic_frame``
  (vLLM >= 0.33, SGLang 0.5.23) each reply carries the topic frame; without it, the older
  vLLM framing;
* both endpoints are offset by the data-parallel rank, and bound or connected by vLLM's
  rule (:mod:`epp.kvevents.endpoints`).

Unlike vLLM's, :meth:`publish` sends from the calling thread (no queue); a background
thread serves replay requests. ``send=False`` keeps a batch for replay without sending it,
which is how tests make a subscriber see a gap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

import zmq

from epp.kvevents import frames
from epp.kvevents.endpoints import is_bind_endpoint, offset_endpoint
from epp.kvevents.msgpack_codec import Dialect, Shape, encode_batch
from epp.kvevents.types import EventError, KvEvent

log = logging.getLogger(__name__)


class ZmqEventPublisher:
    """Publishes KV event batches for one data-parallel rank (see the module docstring)."""

    def __init__(
        self,
        endpoint: str = "tcp://*:5557",
        replay_endpoint: str | None = None,
        *,
        topic: str = "",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        dp_rank: int = 0,
        replay_topic_frame: bool = True,
        shape: Shape = "map",
        dialect: Dialect = "vllm",
        context: zmq.Context | None = None,
    ) -> None:
        if buffer_steps < 0:
            raise ValueError(f"buffer_steps must be >= 0, got {buffer_steps}")
        self.dp_rank = dp_rank
        self.endpoint = offset_endpoint(endpoint, dp_rank)
        self.replay_endpoint = (
            None if replay_endpoint is None else offset_endpoint(replay_endpoint, dp_rank)
        )
        self.topic = topic.encode("utf-8")
        self.shape: Shape = shape
        self.dialect: Dialect = dialect
        self._replay_topic = replay_topic_frame
        self._ctx = context or zmq.Context.instance()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._lock = threading.Lock()
        self._seq = 0
        self._closed = False

        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if is_bind_endpoint(self.endpoint):
            self._pub.bind(self.endpoint)
            self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(self.endpoint)

        self._replay_thread: threading.Thread | None = None
        self._stop = threading.Event()
        if self.replay_endpoint is not None:
            router = self._ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.SNDHWM, 2 * (buffer_steps + 1))
            router.setsockopt(zmq.LINGER, 0)
            router.bind(self.replay_endpoint)
            self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_thread = threading.Thread(
                target=self._serve_replay, args=(router,), name="kv-replay", daemon=True
            )
            self._replay_thread.start()

    @property
    def next_seq(self) -> int:
        return self._seq

    def publish(self, payload: bytes, *, send: bool = True) -> int:
        """Publish one encoded batch; returns its sequence number."""
        if self._closed:
            raise RuntimeError("publisher is closed")
        with self._lock:
            seq = self._seq
            self._seq += 1
            if self._buffer.maxlen:
                self._buffer.append((seq, payload))
        if send:
            self._pub.send_multipart(frames.live_frames(self.topic, seq, payload))
        return seq

    def publish_events(
        self, events: Sequence[KvEvent], ts: float | None = None, *, send: bool = True
    ) -> int:
        """Encode ``events`` as one batch (this publisher's shape and dialect) and publish."""
        payload = encode_batch(
            events,
            time.time() if ts is None else ts,
            self.dp_rank,
            shape=self.shape,
            dialect=self.dialect,
        )
        return self.publish(payload, send=send)

    def restart(self) -> None:
        """Behave like a restarted engine: sequence numbers start again at 0, nothing to replay."""
        with self._lock:
            self._seq = 0
            self._buffer.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._replay_thread is not None:
            self._replay_thread.join(timeout=2)
        self._pub.close(linger=0)

    def __enter__(self) -> ZmqEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve_replay(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(50):
                    continue
                request = router.recv_multipart()
                try:
                    identity, start = frames.parse_replay_request(request)
                except EventError as exc:
                    log.warning("ignoring a malformed replay request: %s", exc)
                    continue
                with self._lock:
                    batches = [(s, p) for s, p in self._buffer if s >= start]
                topic = [self.topic] if self._replay_topic else []
                for seq, payload in batches:
                    router.send_multipart([identity, b"", *topic, frames.seq_bytes(seq), payload])
                # The end marker's topic frame is empty (vLLM 0.33, SGLang 0.5.23).
                end_topic = [b""] if self._replay_topic else []
                router.send_multipart([identity, b"", *end_topic, frames.END_SEQ, b""])
        finally:
            router.close(linger=0)
