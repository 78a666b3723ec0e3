"""ZMQ framing of KV event streams and of the replay protocol (specs/kv-events.md §1, §1.4).

Live stream (PUB → SUB): ``[topic, seq, payload]``; ``seq`` is 8 bytes big-endian unsigned,
starting at 0 per publisher process; an empty topic is an empty frame.

Replay (ROUTER on the engine, DEALER here): the request is ``[b"", start_seq]``; the replies
are ``[b"", topic, seq, payload]`` for each buffered batch with ``seq >= start_seq`` (older
vLLM: ``[b"", seq, payload]``, no topic frame), then an end marker whose seq is -1 as a signed
8-byte big-endian integer and whose payload is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from epp.kvevents.types import EventError

SEQ_BYTES = 8
END_SEQ = b"\xff" * SEQ_BYTES
"""-1 as a signed 8-byte big-endian integer: the replay end marker."""


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(SEQ_BYTES, "big")


@dataclass(frozen=True, slots=True)
class LiveMessage:
    topic: bytes
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """One replayed batch, or the end marker (``end`` true, ``seq`` -1)."""

    seq: int
    payload: bytes
    end: bool = False


def live_frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    return [topic, seq_bytes(seq), payload]


def parse_live(frames: list[bytes]) -> LiveMessage:
    """Parse a live ``[topic, seq, payload]`` message; raises :class:`EventError` (bad_frame)."""
    if len(frames) != 3:
        raise EventError("bad_frame", f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != SEQ_BYTES:
        raise EventError("bad_frame", f"sequence frame must be 8 bytes, got {len(seq)}")
    return LiveMessage(bytes(topic), int.from_bytes(seq, "big"), bytes(payload))


def replay_request(start_seq: int) -> list[bytes]:
    """The frames a DEALER sends to ask for every buffered batch from ``start_seq`` on."""
    return [b"", seq_bytes(start_seq)]


def parse_replay(frames: list[bytes]) -> ReplayItem:
    """Parse one replay reply as the DEALER receives it (both framings)."""
    if len(frames) not in (3, 4) or frames[0] != b"":
        raise EventError(
            "bad_frame", f"replay reply must be [b'', (topic,) seq, payload], got {len(frames)}"
        )
    seq, payload = frames[-2], frames[-1]
    if len(seq) != SEQ_BYTES:
        raise EventError("bad_frame", f"replay sequence frame must be 8 bytes, got {len(seq)}")
    if seq == END_SEQ:
        return ReplayItem(-1, b"", end=True)
    return ReplayItem(int.from_bytes(seq, "big"), bytes(payload))


def parse_replay_request(frames: list[bytes]) -> tuple[bytes, int]:
    """Parse a replay request as the ROUTER receives it: ``[identity, b"", start_seq]``."""
    if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != SEQ_BYTES:
        raise EventError("bad_frame", "replay request must be [identity, b'', 8-byte seq]")
    return bytes(frames[0]), int.from_bytes(frames[2], "big")
