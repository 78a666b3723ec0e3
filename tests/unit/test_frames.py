"""ZMQ framing of live KV event streams and of the replay protocol (specs/kv-events.md §1, §1.4).

Frames are built here with ``struct.pack(">Q"/">q", ...)`` from the spec's rules, not with the
helpers under test.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.kvevents import frames
from epp.kvevents.types import EventError

U64_MAX = (1 << 64) - 1
seq_st = st.integers(0, U64_MAX)
topic_st = st.one_of(st.just(b""), st.text(max_size=30).map(lambda t: t.encode("utf-8")))
payload_st = st.binary(max_size=200)


def be_u64(value: int) -> bytes:
    return struct.pack(">Q", value)


END = struct.pack(">q", -1)  # the spec's end marker: -1 as signed 8-byte big-endian


# --- live stream ----------------------------------------------------------------------------
def test_live_message_with_empty_topic():
    msg = frames.parse_live([b"", be_u64(0), b"\x93\xcb"])
    assert msg.topic == b""
    assert msg.seq == 0
    assert msg.payload == b"\x93\xcb"


def test_live_seq_is_big_endian_unsigned():
    msg = frames.parse_live([b"kv@pod-a", bytes([0, 0, 0, 0, 0, 0, 1, 2]), b"p"])
    assert msg.seq == 258
    assert msg.topic == b"kv@pod-a"
    assert frames.parse_live([b"", b"\xff" * 8, b""]).seq == U64_MAX
    assert frames.parse_live([b"", b"\x80" + b"\x00" * 7, b""]).seq == 1 << 63


@given(topic=topic_st, seq=seq_st, payload=payload_st)
def test_live_frames_match_spec_and_round_trip(topic, seq, payload):
    built = frames.live_frames(topic, seq, payload)
    assert built == [topic, be_u64(seq), payload]
    msg = frames.parse_live([topic, be_u64(seq), payload])
    assert (msg.topic, msg.seq, msg.payload) == (topic, seq, payload)


def test_live_parse_accepts_bytes_like_frames_and_returns_bytes():
    msg = frames.parse_live([bytearray(b"t"), memoryview(be_u64(9)), bytearray(b"pay")])
    assert msg == frames.LiveMessage(b"t", 9, b"pay")
    assert type(msg.topic) is bytes and type(msg.payload) is bytes


@pytest.mark.parametrize(
    "msg",
    [
        [],
        [b""],
        [b"", be_u64(1)],
        [be_u64(1), b"payload"],
        [b"", be_u64(1), b"payload", b"extra"],
        [b"", b"", be_u64(1), b"payload"],
    ],
    ids=["0", "1", "2", "2-no-topic", "4", "4-replay-like"],
)
def test_live_wrong_frame_count_is_bad_frame(msg):
    with pytest.raises(EventError) as info:
        frames.parse_live(msg)
    assert info.value.reason == "bad_frame"


@pytest.mark.parametrize("length", [0, 1, 4, 7, 9, 16])
def test_live_wrong_seq_length_is_bad_frame(length):
    with pytest.raises(EventError) as info:
        frames.parse_live([b"", b"\x01" * length, b"payload"])
    assert info.value.reason == "bad_frame"


# --- replay request -------------------------------------------------------------------------
@given(seq=seq_st)
def test_replay_request_frames(seq):
    assert frames.replay_request(seq) == [b"", be_u64(seq)]


@given(identity=st.binary(min_size=1, max_size=16), seq=seq_st)
def test_parse_replay_request_as_router_sees_it(identity, seq):
    # The ROUTER prepends the DEALER's identity to the DEALER's [b"", start_seq].
    assert frames.parse_replay_request([identity, *frames.replay_request(seq)]) == (identity, seq)
    assert frames.parse_replay_request([identity, b"", be_u64(seq)]) == (identity, seq)


def test_parse_replay_request_returns_bytes():
    identity, seq = frames.parse_replay_request([bytearray(b"\x00id"), b"", be_u64(5)])
    assert identity == b"\x00id" and type(identity) is bytes
    assert seq == 5


@pytest.mark.parametrize(
    "msg",
    [
        [],
        [b"id"],
        [b"id", b""],
        [b"", be_u64(3)],  # no identity
        [b"id", b"x", be_u64(3)],  # non-empty delimiter
        [b"id", b"", b"\x00" * 7],
        [b"id", b"", b"\x00" * 9],
        [b"id", b"", be_u64(3), b"extra"],
    ],
    ids=["0", "1", "2", "no-identity", "delimiter", "short-seq", "long-seq", "4"],
)
def test_parse_replay_request_rejects_bad_frames(msg):
    with pytest.raises(EventError) as info:
        frames.parse_replay_request(msg)
    assert info.value.reason == "bad_frame"


# --- replay replies -------------------------------------------------------------------------
@given(topic=topic_st, seq=st.integers(0, (1 << 63) - 1), payload=payload_st)
def test_replay_reply_with_topic_frame(topic, seq, payload):
    item = frames.parse_replay([b"", topic, be_u64(seq), payload])
    assert (item.seq, item.payload, item.end) == (seq, payload, False)


@given(seq=st.integers(0, (1 << 63) - 1), payload=payload_st)
def test_replay_reply_without_topic_frame(seq, payload):
    item = frames.parse_replay([b"", be_u64(seq), payload])
    assert (item.seq, item.payload, item.end) == (seq, payload, False)


def test_replay_reply_seq_is_big_endian():
    item = frames.parse_replay([b"", b"kv@pod-a", bytes([0, 0, 0, 0, 0, 0, 1, 0]), b"p"])
    assert item.seq == 256
    item = frames.parse_replay([b"", bytes([0, 0, 0, 0, 0, 0, 0, 2]), b"p"])
    assert item.seq == 2


def test_end_marker_constant_is_signed_minus_one():
    assert frames.END_SEQ == END
    assert frames.SEQ_BYTES == 8


@pytest.mark.parametrize(
    "msg",
    [[b"", b"", END, b""], [b"", b"kv@pod-a", END, b""], [b"", END, b""]],
    ids=["new-empty-topic", "new-with-topic", "old"],
)
def test_replay_end_marker(msg):
    item = frames.parse_replay(msg)
    assert item.end is True
    assert item.seq == -1
    assert item.payload == b""


def test_replay_sequence_from_the_spec_check():
    # §1.4: replay from 2 returned 2, 3, 4, then -1 (topic kv@pod-a).
    topic = b"kv@pod-a"
    replies = [[b"", topic, be_u64(s), f"batch-{s}".encode()] for s in (2, 3, 4)]
    replies.append([b"", b"", END, b""])
    items = [frames.parse_replay(r) for r in replies]
    assert [i.seq for i in items] == [2, 3, 4, -1]
    assert [i.end for i in items] == [False, False, False, True]
    assert [i.payload for i in items[:3]] == [b"batch-2", b"batch-3", b"batch-4"]


def test_replay_items_are_bytes():
    item = frames.parse_replay([b"", memoryview(be_u64(4)), bytearray(b"xyz")])
    assert item == frames.ReplayItem(4, b"xyz", False)
    assert type(item.payload) is bytes


@pytest.mark.parametrize(
    "msg",
    [
        [],
        [b""],
        [b"", be_u64(1)],
        [b"", b"t", be_u64(1), b"p", b"extra"],
        [b"x", be_u64(1), b"p"],  # missing empty delimiter (old framing)
        [b"x", b"t", be_u64(1), b"p"],  # missing empty delimiter (new framing)
        [b"", b"\x00" * 7, b"p"],
        [b"", b"t", b"\x00" * 9, b"p"],
        [b"", b"t", b"", b"p"],
    ],
    ids=[
        "0",
        "1",
        "2",
        "5",
        "old-delimiter",
        "new-delimiter",
        "old-short-seq",
        "new-long-seq",
        "new-empty-seq",
    ],
)
def test_replay_reply_bad_frames(msg):
    with pytest.raises(EventError) as info:
        frames.parse_replay(msg)
    assert info.value.reason == "bad_frame"
