"""The vLLM-compatible publisher and the endpoint rules, on real ZMQ sockets (one process)."""

from __future__ import annotations

import time

import pytest
import zmq

from epp.kvevents import frames
from epp.kvevents.endpoints import is_bind_endpoint, offset_endpoint, tcp_port
from epp.kvevents.msgpack_codec import decode_batch
from epp.kvevents.publisher import ZmqEventPublisher
from epp.kvevents.types import BlockStored


@pytest.mark.parametrize(
    ("endpoint", "bind"),
    [
        ("tcp://*:5557", True),
        ("tcp://[::]:5557", True),
        ("ipc:///tmp/kv", True),
        ("inproc://kv", True),
        ("tcp://collector:5557", False),
        ("tcp://10.0.0.7:5557", False),
    ],
)
def test_bind_or_connect(endpoint, bind):
    assert is_bind_endpoint(endpoint) is bind


@pytest.mark.parametrize(
    ("endpoint", "rank", "expected"),
    [
        ("tcp://*:5557", 0, "tcp://*:5557"),
        ("tcp://*:5557", 3, "tcp://*:5560"),
        ("tcp://10.1.2.3:20080", 1, "tcp://10.1.2.3:20081"),
        ("tcp://*:0", 2, "tcp://*:0"),
        ("inproc://cache", 2, "inproc://cache_dp2"),
    ],
)
def test_dp_rank_offsets(endpoint, rank, expected):
    assert offset_endpoint(endpoint, rank) == expected


@pytest.mark.parametrize("bad", ["udp://x:1", "tcp://host", "tcp://host:port"])
def test_bad_endpoints_are_refused(bad):
    with pytest.raises(ValueError):
        offset_endpoint(bad, 1)


def test_tcp_port():
    assert tcp_port("tcp://a:99") == 99
    assert tcp_port("ipc:///x") is None


def _recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "nothing received"
    return sock.recv_multipart()


def _subscribed(ctx: zmq.Context, pub: ZmqEventPublisher, topic: bytes = b"") -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(pub.endpoint.replace("0.0.0.0", "127.0.0.1"))
    # Publish probes until the subscription is live (ZMQ's slow-joiner window).
    deadline = time.monotonic() + 10
    while not sub.poll(20):
        assert time.monotonic() < deadline
        pub.publish(b"probe")
    while sub.poll(50):
        sub.recv_multipart()
    return sub


@pytest.mark.parametrize("topic_frame", [True, False])
def test_live_frames_and_replay(topic_frame):
    ctx = zmq.Context()
    pub = ZmqEventPublisher(
        "tcp://*:0", "tcp://*:0", topic="kv@pod-a", replay_topic_frame=topic_frame, context=ctx
    )
    sub = _subscribed(ctx, pub, b"kv@pod-a")
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(pub.replay_endpoint.replace("0.0.0.0", "127.0.0.1"))
    try:
        first = pub.next_seq
        ev = BlockStored([1, 2], None, list(range(32)), 16, medium="GPU")
        for _ in range(3):
            pub.publish_events([ev], ts=1.5)
        pub.publish_events([ev], ts=1.5, send=False)  # kept for replay only
        got = [frames.parse_live(_recv(sub)) for _ in range(3)]
        assert [g.seq for g in got] == [first, first + 1, first + 2]
        assert all(g.topic == b"kv@pod-a" for g in got)
        assert not sub.poll(200), "an unsent batch went out"
        batch = decode_batch(got[0].payload)
        assert batch.dp_rank == 0 and batch.ts == 1.5
        assert list(batch.events[0].block_hashes) == [1, 2]

        dealer.send_multipart(frames.replay_request(first + 1))
        replies = []
        while True:
            reply = _recv(dealer)
            assert len(reply) == (4 if topic_frame else 3)
            if topic_frame:
                assert reply[1] in (b"kv@pod-a", b"")
            item = frames.parse_replay(reply)
            if item.end:
                if topic_frame:
                    assert reply[1] == b""  # the end marker's topic frame is empty
                break
            replies.append(item.seq)
        assert replies == [first + 1, first + 2, first + 3]
    finally:
        dealer.close(0)
        sub.close(0)
        pub.close()
        ctx.term()


def test_buffer_keeps_only_the_last_steps_and_restart_resets():
    ctx = zmq.Context()
    pub = ZmqEventPublisher("tcp://*:0", "tcp://*:0", buffer_steps=5, context=ctx)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(pub.replay_endpoint.replace("0.0.0.0", "127.0.0.1"))
    try:
        for n in range(12):
            assert pub.publish(b"x%d" % n, send=False) == n
        dealer.send_multipart(frames.replay_request(0))
        seqs = []
        while not (item := frames.parse_replay(_recv(dealer))).end:
            seqs.append(item.seq)
        assert seqs == [7, 8, 9, 10, 11]
        pub.restart()
        assert pub.publish(b"again", send=False) == 0
        dealer.send_multipart(frames.replay_request(0))
        seqs = []
        while not (item := frames.parse_replay(_recv(dealer))).end:
            seqs.append(item.seq)
        assert seqs == [0]
    finally:
        dealer.close(0)
        pub.close()
        ctx.term()


def test_malformed_replay_requests_are_ignored():
    ctx = zmq.Context()
    pub = ZmqEventPublisher("tcp://*:0", "tcp://*:0", context=ctx)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(pub.replay_endpoint.replace("0.0.0.0", "127.0.0.1"))
    try:
        pub.publish(b"p", send=False)
        dealer.send_multipart([b"", b"short"])
        dealer.send_multipart(frames.replay_request(0))
        item = frames.parse_replay(_recv(dealer))
        assert item.seq == 0 and item.payload == b"p"
        assert frames.parse_replay(_recv(dealer)).end
    finally:
        dealer.close(0)
        pub.close()
        ctx.term()


def test_rank_offsets_apply_to_both_endpoints(tmp_path):
    ctx = zmq.Context()
    pub = ZmqEventPublisher(
        f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/replay", dp_rank=2, context=ctx
    )
    try:
        assert pub.endpoint == f"ipc://{tmp_path}/events_dp2"
        assert pub.replay_endpoint == f"ipc://{tmp_path}/replay_dp2"
        assert (tmp_path / "events_dp2").exists() and (tmp_path / "replay_dp2").exists()
    finally:
        pub.close()
        ctx.term()
