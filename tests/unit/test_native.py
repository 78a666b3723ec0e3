"""The compiled hot-path helpers (epp._kvnative) against their pure-Python twins and against
independent references (xxhash, struct, a dict), and the compiled batch decoder against the
Python decoder, which defines the format.

Every helper test runs on both implementations; when the extension is not in use (it was
not built, or KVPICK_PURE_PYTHON=1) the comparisons with it are skipped, but
``test_extension_is_in_use`` fails, so CI cannot lose the extension quietly.
"""

from __future__ import annotations

import gc
import os
import random
import struct
import weakref
from array import array
from typing import Any

import msgpack
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from epp import native
from epp.kvevents import msgpack_codec
from epp.kvevents.types import AllBlocksCleared, BlockRemoved, BlockStored, EventError

U64 = 1 << 64
EXT = native._ext
PURE_REQUESTED = os.environ.get("KVPICK_PURE_PYTHON", "") not in ("", "0")

needs_ext = pytest.mark.skipif(EXT is None, reason="compiled helpers not in use")


def impls(name: str) -> list[Any]:
    found = [pytest.param(getattr(native, f"py_{name}"), id="python")]
    if EXT is not None:
        found.append(pytest.param(getattr(EXT, name), id="native"))
    return found


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_extension_is_in_use():
    """CI builds the extension; only an explicit KVPICK_PURE_PYTHON run may go without."""
    assert native.NATIVE is (not PURE_REQUESTED)
    assert (native.fast_decode_batch is None) is PURE_REQUESTED


# ------------------------------------------------------------------ block keys (XXH3-64)


@pytest.mark.parametrize("block_keys", impls("block_keys"))
@pytest.mark.parametrize("block_size", [*range(1, 66), 128, 256])
def test_block_keys_match_xxhash_for_every_block_size(block_keys, block_size):
    rng = random.Random(block_size)
    for seed in (0, 1337, U64 - 1, rng.getrandbits(64)):
        tokens = [rng.getrandbits(32) for _ in range(block_size * 3 + block_size // 2)]
        packed = struct.pack(f"<{len(tokens)}I", *tokens)
        width = 4 * block_size
        expected = [
            xxhash.xxh3_64_intdigest(packed[i : i + width], seed) for i in (0, width, 2 * width)
        ]
        got = block_keys(packed, block_size, seed)
        assert isinstance(got, array) and got.typecode == "Q"
        assert list(got) == expected


@pytest.mark.parametrize("block_keys", impls("block_keys"))
def test_block_keys_edges(block_keys):
    assert list(block_keys(b"", 16, 1)) == []
    assert list(block_keys(b"\x00" * 63, 16, 1)) == []  # no full block
    with pytest.raises(ValueError):
        block_keys(b"\x00" * 64, 0, 1)
    with pytest.raises((OverflowError, ValueError)):
        block_keys(b"\x00" * 64, 16, -1)
    assert list(block_keys(memoryview(b"\x01" * 64), 16, 7)) == [
        xxhash.xxh3_64_intdigest(b"\x01" * 64, 7)
    ]


# ------------------------------------------------------------------ token ids


token_lists = st.lists(
    st.one_of(
        st.integers(0, 127),
        st.integers(128, 255),
        st.integers(256, 65535),
        st.integers(65536, (1 << 32) - 1),
    ),
    max_size=300,
)


@given(tokens=token_lists)
@settings(max_examples=300, deadline=None)
def test_tokens_u32_both_implementations_pack_like_struct(tokens):
    expected = struct.pack(f"<{len(tokens)}I", *tokens)
    payload = pack(tokens)
    assert native.py_tokens_u32(payload) == expected
    assert native.py_pack_u32(tokens) == expected
    if EXT is not None:
        assert EXT.tokens_u32(payload) == expected
        assert EXT.pack_u32(tokens) == expected


def _wide_forms(tokens: list[int]) -> bytes:
    """The same array with every id in a non-minimal but valid msgpack form, behind an
    array32 header."""
    out = bytearray(b"\xdd" + struct.pack(">I", len(tokens)))
    for i, t in enumerate(tokens):
        out += (b"\xcf" + struct.pack(">Q", t)) if i % 2 else (b"\xd3" + struct.pack(">q", t))
    return bytes(out)


@pytest.mark.parametrize("tokens_u32", impls("tokens_u32"))
def test_tokens_u32_accepts_every_integer_form(tokens_u32):
    tokens = [0, 5, 200, 70000, (1 << 32) - 1, 17]
    assert tokens_u32(_wide_forms(tokens)) == struct.pack("<6I", *tokens)
    many = list(range(70000))  # array32 header from msgpack itself
    assert tokens_u32(pack(many)) == struct.pack(f"<{len(many)}I", *many)


BAD_TOKEN_PAYLOADS = [
    pack([-1]),
    pack([1 << 32]),
    pack([1, "x"]),
    pack([1.5]),
    pack([None]),
    pack([True]),
    pack([[1]]),
    pack({"a": 1}),
    pack("abc"),
    pack(7),
    b"",
    b"\x93\x01\x02",  # three announced, two present
    b"\x92\x01\x02\x03",  # trailing byte
    b"\xdd\xff\xff\xff\xff\x01",  # absurd length
    b"\x91\xce\x00\x00",  # truncated uint32
    b"\xc1",
]


@pytest.mark.parametrize("tokens_u32", impls("tokens_u32"))
@pytest.mark.parametrize("payload", BAD_TOKEN_PAYLOADS)
def test_tokens_u32_rejects_what_is_not_a_token_array(tokens_u32, payload):
    with pytest.raises(ValueError):
        tokens_u32(payload)


@pytest.mark.parametrize("pack_u32", impls("pack_u32"))
@pytest.mark.parametrize("bad", [[-1], [1 << 32], [1, "2"], [1.0], [None]])
def test_pack_u32_rejects_non_u32(pack_u32, bad):
    with pytest.raises(ValueError):
        pack_u32(bad)


# ------------------------------------------------------------------ engine block hashes


hash_values = st.one_of(
    st.integers(0, U64 - 1),
    st.integers(-(1 << 63), -1),
    st.binary(min_size=1, max_size=40),
)


@given(values=st.lists(hash_values, max_size=40))
@settings(max_examples=300, deadline=None)
def test_u64s_normalise_like_the_spec(values):
    expected = [v % U64 if isinstance(v, int) else int.from_bytes(v[-8:], "big") for v in values]
    payload = pack(values)
    assert list(native.py_u64s(payload)) == expected
    if EXT is not None:
        got = EXT.u64s(payload)
        assert got.typecode == "Q" and list(got) == expected


@pytest.mark.parametrize("u64s", impls("u64s"))
@pytest.mark.parametrize(
    "payload",
    [
        pack([b""]),
        pack(["abc"]),
        pack([1.5]),
        pack([None]),
        pack({"a": 1}),
        pack(3),
        b"",
        b"\x92\x01",
    ],
)
def test_u64s_reject_what_is_not_a_hash_array(u64s, payload):
    with pytest.raises(ValueError):
        u64s(payload)


@needs_ext
@pytest.mark.parametrize("name", ["tokens_u32", "u64s"])
@given(data=st.binary(max_size=64))
@settings(max_examples=1000, deadline=None)
def test_array_parsers_agree_on_arbitrary_bytes(name, data):
    def run(fn):
        try:
            return bytes(fn(data))
        except ValueError:
            return "error"

    assert run(getattr(EXT, name)) == run(getattr(native, f"py_{name}"))


# ------------------------------------------------------------------ U64Map


def map_classes() -> list[Any]:
    found = [pytest.param(native.PyU64Map, id="python")]
    if EXT is not None:
        found.append(pytest.param(EXT.U64Map, id="native"))
    return found


@pytest.mark.parametrize("cls", map_classes())
def test_u64map_basics(cls):
    m = cls()
    a, b = object(), object()
    assert m.insert_new(array("Q", [1, 2, 3, 2, 4]), a) == 3  # stops at the repeated 2
    assert len(m) == 3 and 4 not in m and m.get(2) is a and m[3] is a
    assert m.insert_new([3, 9], b) == 0
    m.assign([3, 9], b)
    assert m.get(3) is b and m.get(9) is b and len(m) == 4
    assert m.discard_if([1, 3, 9, 77], b) == 2
    assert sorted(k for k, _ in m.items()) == [1, 2]
    assert m.pop(1) is a and m.pop(1, "gone") == "gone"
    with pytest.raises(KeyError):
        m.pop(1)
    with pytest.raises(KeyError):
        del m[12345]
    m[U64 - 1] = a
    assert m.get(U64 - 1) is a
    assert m.get(-1) is None and -1 not in m and m.get(U64, "no") == "no"
    with pytest.raises((OverflowError, ValueError)):
        m.assign([-1], a)
    m.clear()
    assert len(m) == 0 and m.get(2) is None


@pytest.mark.parametrize("cls", map_classes())
def test_u64map_releases_its_values(cls):
    class Value:
        pass

    m = cls()
    v = Value()
    ref = weakref.ref(v)
    m.assign(range(1000), v)
    del v
    assert ref() is not None
    m.discard_if(range(500), ref())
    assert len(m) == 500
    del m
    gc.collect()
    assert ref() is None


class U64MapMachine(RuleBasedStateMachine):
    """The map against a dict, through growth and backward-shift deletions. Keys are drawn
    from a small pool (many collisions of homes at small capacities) and from everywhere."""

    cls: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.m = self.cls()
        self.model: dict[int, object] = {}
        self.values = [object() for _ in range(3)]

    keys = st.one_of(st.integers(0, 64), st.integers(0, U64 - 1))
    key_lists = st.lists(keys, max_size=40)
    values = st.integers(0, 2)

    @rule(ks=key_lists, v=values)
    def insert_new(self, ks, v):
        value = self.values[v]
        done = 0
        for k in ks:
            if k in self.model:
                break
            self.model[k] = value
            done += 1
        assert self.m.insert_new(array("Q", ks), value) == done

    @rule(ks=key_lists, v=values)
    def assign(self, ks, v):
        for k in ks:
            self.model[k] = self.values[v]
        self.m.assign(ks, self.values[v])

    @rule(ks=key_lists, v=values)
    def discard_if(self, ks, v):
        gone = 0
        for k in ks:
            if self.model.get(k) is self.values[v]:
                del self.model[k]
                gone += 1
        assert self.m.discard_if(array("Q", ks), self.values[v]) == gone

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pop_known(self, data):
        k = data.draw(st.sampled_from(sorted(self.model)))
        assert self.m.pop(k) is self.model.pop(k)

    @rule(k=keys)
    def lookup(self, k):
        assert self.m.get(k) is self.model.get(k)
        assert (k in self.m) == (k in self.model)

    @invariant()
    def same_size(self):
        assert len(self.m) == len(self.model)

    def teardown(self) -> None:
        assert dict(self.m.items()) == self.model


@pytest.mark.parametrize("cls", map_classes())
def test_u64map_against_a_dict(cls):
    machine = type("Machine", (U64MapMachine,), {"cls": cls})
    settings_ = settings(max_examples=150, stateful_step_count=60, deadline=None)
    machine.TestCase.settings = settings_
    machine.TestCase().runTest()


# ------------------------------------------------------------------ batch decoder


def python_decode(payload: bytes):
    saved = msgpack_codec.fast_decode_batch
    msgpack_codec.fast_decode_batch = None
    try:
        return msgpack_codec.decode_batch(payload)
    finally:
        msgpack_codec.fast_decode_batch = saved


def normal(ev: Any) -> tuple:
    """An event as comparable plain data (hash arrays as lists, raw token bytes as bytes)."""
    if isinstance(ev, BlockStored):
        raw = ev.token_ids_msgpack
        return (
            "S",
            list(ev.block_hashes),
            ev.parent_hash,
            ev.token_ids,
            ev.block_size,
            ev.medium,
            ev.lora_name,
            ev.lora_id,
            ev.cache_salt,
            ev.extra_keys,
            ev.group_idx,
            ev.kv_cache_spec_kind,
            None if raw is None else bytes(raw),
        )
    if isinstance(ev, BlockRemoved):
        return ("R", list(ev.block_hashes), ev.medium, ev.group_idx)
    assert isinstance(ev, AllBlocksCleared)
    return ("C",)


def check_agreement(payload: bytes) -> bool:
    """The fast decoder either declines or agrees with the Python decoder; True if it
    decoded."""
    fast = EXT.decode_batch(payload, BlockStored, BlockRemoved, AllBlocksCleared)
    if fast is None:
        return False
    ts, events, dp_rank = fast
    ref = python_decode(payload)
    assert ref.rejected == [], "the fast path accepted events the Python decoder rejects"
    assert (ts, dp_rank) == (ref.ts, ref.dp_rank)
    assert type(ts) is float
    assert [normal(e) for e in events] == [normal(e) for e in ref.events]
    return True


# Values of every msgpack type, for fields and unknown keys.
any_value = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(1 << 63), U64 - 1),
        st.floats(allow_nan=False, width=32),
        st.text(max_size=8),
        st.binary(max_size=10),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


def odd(typical: st.SearchStrategy, plain: bool) -> st.SearchStrategy:
    """Typical values, and when not ``plain`` sometimes anything."""
    return typical if plain else st.one_of(*[typical] * 15, any_value)


hashes_st = st.lists(
    st.one_of(
        st.integers(0, U64 - 1), st.integers(-(1 << 63), -1), st.binary(min_size=1, max_size=33)
    ),
    max_size=6,
)
tokens_st = st.lists(st.integers(0, (1 << 32) - 1), max_size=40)
small_str = st.one_of(
    st.none(), st.sampled_from(["GPU", "CPU", "cpu", "disk", "full_attention", "a"])
)
int_or_none = st.one_of(st.none(), st.integers(0, 64))


@st.composite
def stored_fields(draw, plain: bool) -> dict[str, Any]:
    fields = {
        "block_hashes": draw(odd(hashes_st, plain)),
        "parent_block_hash": draw(
            odd(
                st.one_of(
                    st.none(), st.integers(0, U64 - 1), st.binary(min_size=int(plain), max_size=9)
                ),
                plain,
            )
        ),
        "token_ids": draw(odd(tokens_st, plain)),
        "block_size": draw(odd(int_or_none, plain)),
        "lora_id": draw(odd(int_or_none, plain)),
        "medium": draw(odd(small_str, plain)),
        "lora_name": draw(odd(small_str, plain)),
        "extra_keys": None if plain else draw(st.one_of(*[st.none()] * 7, any_value)),
        "group_idx": draw(odd(int_or_none, plain)),
        "kv_cache_spec_kind": draw(odd(small_str, plain)),
    }
    return fields


@st.composite
def events(draw, plain: bool) -> Any:
    kinds = ["BlockStored", "BlockStored", "BlockRemoved", "AllBlocksCleared"]
    kind = draw(st.sampled_from(kinds if plain else [*kinds, "Other"]))
    if kind in ("BlockStored", "Other"):
        fields = draw(stored_fields(plain))
    elif kind == "BlockRemoved":
        fields = {
            "block_hashes": draw(odd(hashes_st, plain)),
            "medium": draw(odd(small_str, plain)),
            "group_idx": draw(odd(int_or_none, plain)),
        }
    else:
        fields = {}
    names = list(fields)
    if draw(st.booleans()):  # map shape
        present = [n for n in names if plain or draw(st.integers(0, 5)) > 0]
        event: Any = {n: fields[n] for n in present}
        if kind == "BlockStored" and draw(st.integers(0, 4)) == 0:
            event["cache_salt"] = draw(odd(small_str, plain))
        for extra in draw(
            st.lists(
                st.sampled_from(["locality", "session_id", "zz", "lookahead_token_ids"]), max_size=2
            )
        ):
            event[extra] = draw(any_value)
        items = list(event.items())
        items.insert(draw(st.integers(0, len(items))), ("type", kind))
        if not plain and draw(st.integers(0, 15)) == 0:
            items = [it for it in items if it[0] != "type"]
        return dict(items)
    keep = draw(st.integers(min(int(plain), len(names)), len(names)))
    event = [kind, *[fields[n] for n in names[:keep]]]
    if (keep == len(names) or not plain) and draw(st.integers(0, 5)) == 0:
        event += draw(st.lists(any_value, max_size=2))
    return event


@st.composite
def batches(draw, plain: bool = False) -> bytes:
    ts = draw(
        st.one_of(
            st.floats(allow_nan=False, allow_infinity=False, width=32), st.integers(0, 1 << 40)
        )
    )
    evs = draw(st.lists(events(plain), max_size=5))
    shape = draw(st.sampled_from(["3", "2"] if plain else ["3"] * 6 + ["2", "4"]))
    batch: list[Any] = [ts, evs]
    if shape in ("3", "4"):
        batch.append(draw(odd(st.one_of(st.none(), st.integers(0, 8)), plain)))
    if shape == "4":
        batch.append(draw(any_value))
    return msgpack.packb(batch, use_bin_type=True, use_single_float=draw(st.booleans()))


@needs_ext
@given(payload=batches(plain=True))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_decoder_decodes_plain_batches_as_the_python_decoder_does(payload):
    """Well-formed batches of both shapes, fields in any order, unknown keys, trailing
    elements: the fast path takes them all and builds the same events."""
    assert check_agreement(payload)


@needs_ext
@given(payload=batches())
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_decoder_agrees_with_the_python_decoder(payload):
    """Odd values anywhere: the fast path declines or agrees, never differs."""
    check_agreement(payload)


@needs_ext
@given(payload=batches(), data=st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_decoder_on_corrupted_batches(payload, data):
    """Cut, flipped or spliced bytes: never a crash, and agreement whenever it decodes."""
    buf = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 3))):
        if not buf:
            break
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[i:]
        else:
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    check_agreement(bytes(buf))


def _engine_events(rng: random.Random, n: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(n):
        roll = rng.random()
        hashes = [rng.getrandbits(64) for _ in range(rng.randint(1, 8))]
        if roll < 0.7:
            out.append(
                BlockStored(
                    hashes,
                    rng.choice([None, rng.getrandbits(64)]),
                    [rng.randrange(200_000) for _ in range(16 * len(hashes))],
                    16,
                    medium=rng.choice([None, "GPU", "CPU"]),
                    lora_name=rng.choice([None, "adapter-1"]),
                    lora_id=rng.choice([None, 3]),
                    group_idx=rng.choice([None, 0]),
                    kv_cache_spec_kind=rng.choice([None, "full_attention"]),
                )
            )
        elif roll < 0.95:
            out.append(BlockRemoved(hashes, rng.choice([None, "GPU"])))
        else:
            out.append(AllBlocksCleared())
    return out


@needs_ext
@pytest.mark.parametrize(
    ("shape", "dialect"), [("map", "vllm"), ("array", "vllm"), ("map", "sglang")]
)
def test_fast_decoder_takes_what_the_engines_publish(shape, dialect):
    """The engines' own batches (the encoder reproduces them byte for byte) never fall back
    to the slow path, so the measured speed is the speed a real stream gets."""
    rng = random.Random(shape + dialect)
    for i in range(200):
        payload = msgpack_codec.encode_batch(
            _engine_events(rng, rng.randint(0, 6)),
            float(i),
            rng.choice([0, 1, None]),
            shape=shape,
            dialect=dialect,
        )
        assert check_agreement(payload), payload


@needs_ext
def test_fast_decoder_declines_what_it_does_not_handle():
    stored = {"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2], "block_size": 2}
    declined = [
        pack({"ts": 1.0, "events": [stored]}),  # map-shaped batch
        pack([1.0, [{**stored, "extra_keys": [[["cache_salt", "s"]]]}], 0]),
        pack([1.0, [{**stored, "type": "BlockUpdated"}], 0]),
        pack([1.0, [{**stored, "medium": 5}], 0]),
        pack([1.0, [{**stored, "block_hashes": [b""]}], 0]),
        pack([1.0, [{**stored, "token_ids": "abc"}], 0]),
        pack([1.0, [stored], 0]) + b"\x00",
        b"",
    ]
    for payload in declined:
        assert EXT.decode_batch(payload, BlockStored, BlockRemoved, AllBlocksCleared) is None
        try:  # and the Python decoder has the last word: a batch, or a clear error
            msgpack_codec.decode_batch(payload)
        except EventError as exc:
            assert exc.reason in ("bad_msgpack", "bad_batch")


# ------------------------------------------------------------------ the index, both ways


def _ingest_and_query(frames, wl, queries) -> tuple[list, list, dict]:
    from epp.kvindex import KvIndex

    index = KvIndex(wl.block_size)
    for w in range(wl.workers):
        index.add_worker(w)
    for worker, frame in frames:
        for event in msgpack_codec.decode_batch(frame).events:
            index.apply(worker, event)
    index.check_invariants()
    answers = [(m.depths, m.tiered) for m in map(index.find_matches, queries)]
    counts = [index.block_count(w) for w in range(wl.workers)]
    return answers, counts, dict(index.rejected)


@needs_ext
def test_index_gives_the_same_answers_with_and_without_the_extension(monkeypatch):
    """A multi-tenant workload with evictions, in both event shapes, through the compiled
    helpers and through the pure-Python ones: same matches, same counts, nothing rejected."""
    from bench.workload import generate
    from epp.kvindex import index as index_module

    wl = generate(workers=6, capacity=300, block_size=16, prompt_blocks=128, tenants=8, seed=3)
    frames = [
        (w, msgpack_codec.encode_batch(evs, float(i), 0, shape="array" if i % 3 else "map"))
        for i, (w, evs) in enumerate(wl.batches)
    ]
    assert any(isinstance(ev, BlockRemoved) for _, evs in wl.batches for ev in evs)
    queries = [wl.query()[0] for _ in range(150)]
    native_run = _ingest_and_query(frames, wl, queries)

    monkeypatch.setattr(index_module, "U64Map", native.PyU64Map)
    monkeypatch.setattr(index_module, "tokens_u32", native.py_tokens_u32)
    monkeypatch.setattr(native, "block_keys", native.py_block_keys)
    monkeypatch.setattr(native, "pack_u32", native.py_pack_u32)
    monkeypatch.setattr(msgpack_codec, "fast_decode_batch", None)
    monkeypatch.setattr(msgpack_codec, "u64s", native.py_u64s)
    pure_run = _ingest_and_query(frames, wl, queries)

    assert native_run == pure_run
    answers, counts, rejected = native_run
    assert rejected == {}
    assert sum(counts) == 6 * 300  # the caches filled up, with evictions on the way
    assert sum(1 for depths, _ in answers if depths) > 100  # most queries matched someone


def test_json_depth_twins_agree():
    import random

    from epp import native

    pure = native.py_json_depth_exceeds
    fast = native.json_depth_exceeds
    rng = random.Random(7)
    cases = [b"", b"[[[]]]", b'{"a":"[[[["}', b'["\\"[[["]', b'[["abc', b'["\\', b"]]][[["]
    cases += [
        bytes(rng.choice(b'[]{}"\\a') for _ in range(rng.randint(0, 24))) for _ in range(3000)
    ]
    for text in cases:
        for limit in range(4):
            assert fast(text, limit) == pure(text, limit), (text, limit)
    assert fast(bytearray(b"[" * 200), 128) and not fast(memoryview(b"[" * 128), 128)
