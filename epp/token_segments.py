"""Encoding chat text segment by segment, so that repeated segments are tokenized once.

A Hugging Face tokenizer splits its input at added tokens before anything else runs: the
normalizer, the pre-tokenizer and the model then see each piece between two special tokens
on its own. Rendered chat templates put special tokens between messages, so the token ids
of a conversation are the concatenation of each special token's id and each in-between
piece's ids — and the pieces repeat: the same system prompt, the same earlier turns. The
:class:`SegmentEncoder` caches each piece's ids: long pieces least recently used first out
within a memory budget (``max_bytes``, 16 MiB by default, text and ids counted), short
ones (mostly the template's own text) in a table bounded by count.

It is only used where it is exact. :meth:`SegmentEncoder.for_backend` returns None when a
special token strips whitespace, matches single words or is normalized (its neighbours
would then depend on it), and when probe texts do not encode identically both ways (for
example a ``Metaspace`` pre-tokenizer that marks only the first piece of the whole input).
Encoding is always without the post-processor's special tokens, as chat requests are.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import tokenizers

from epp.token_budget import TokenBudget, TokenLimitReached
from epp.word_encoder import WordEncoder

IdsEncoder = Callable[[str, bool], list[int]]
BoundedEncoder = Callable[[str, TokenBudget], list[int]]
"""``f(text, budget)``: the ids without special tokens, or the budget's exception."""


def ids_encoders(backend: tokenizers.Tokenizer) -> tuple[IdsEncoder, BoundedEncoder]:
    """Two encoders equal to ``backend.encode(...).ids``, but cheaper:

    * ``f(text, add_special_tokens)``: without special tokens, word by word through a
      :class:`~epp.word_encoder.WordEncoder` where that is exact; otherwise through
      ``encode_batch_fast`` where the library has it (tokenizers >= 0.21), which skips the
      character offsets the EPP never reads;
    * ``g(text, budget)``: without special tokens, within a :class:`TokenBudget`; word by
      word where the word encoder exists, so that it stops early; otherwise the library's
      encoding, checked against the budget once done (the caller bounds the text's length).
    """
    fast = getattr(backend, "encode_batch_fast", None)

    def base(text: str, special: bool) -> list[int]:
        if fast is None:
            return backend.encode(text, add_special_tokens=special).ids
        return fast([text], add_special_tokens=special)[0].ids

    def base_bounded(text: str, budget: TokenBudget) -> list[int]:
        ids = base(text, False)
        budget.check(len(ids))
        return ids

    words = WordEncoder.for_backend(backend)
    if words is None:
        return base, base_bounded
    plain = words.encode
    return (lambda text, special: base(text, True) if special else plain(text)), (
        words.encode_bounded
    )


def ids_encoder(backend: tokenizers.Tokenizer) -> IdsEncoder:
    """The first of :func:`ids_encoders`."""
    return ids_encoders(backend)[0]


_PROBES = (
    "plain text, no special token",
    "{0}hello{1} world{0}\n\nagain  with  spaces {1}",
    " leading space{0} {1}trailing space ",
    "{0}{1}{0}",
    "line\n{1}\n\nnext\tline{0}ünïcödé 文字 {1}",
)


def _cost(piece: str, ids: Sequence[int]) -> int:
    """About what a cache entry holds in memory: the text, and per id a tuple slot and (for
    ids past CPython's small-int cache) an int object."""
    return len(piece) + 40 * len(ids) + 100


class SegmentEncoder:
    """``encode(text)`` equals ``backend.encode(text, add_special_tokens=False).ids``."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        specials: dict[str, int],
        *,
        max_bytes: int = 16 << 20,
        min_cached_chars: int = 256,
        max_small: int = 4096,
        encode_ids: IdsEncoder | None = None,
        encode_bounded: BoundedEncoder | None = None,
    ) -> None:
        """``encode_ids`` / ``encode_bounded``: the backend's :func:`ids_encoders` when the
        caller has them already (their word cache is then shared)."""
        self._backend = backend
        if encode_ids is None or encode_bounded is None:
            encode_ids, encode_bounded = ids_encoders(backend)
        self._encode_ids = encode_ids
        self._encode_bounded = encode_bounded
        self._ids = specials
        ordered = sorted(specials, key=len, reverse=True)  # the longest match wins
        self._pattern = re.compile("|".join(re.escape(s) for s in ordered))
        # Entries are tuples: a tuple of ints is untracked by the garbage collector, so a
        # full collection does not walk the cache's millions of ids (as lists, it did,
        # for tens of milliseconds every few seconds under load).
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._min = min_cached_chars
        self._lock = threading.Lock()
        self._small: dict[str, tuple[int, ...]] = {}
        self._max_small = max_small
        self.hits = 0
        self.misses = 0

    @classmethod
    def for_backend(cls, backend: tokenizers.Tokenizer, **kwargs: Any) -> SegmentEncoder | None:
        """An encoder for ``backend``, or None when segment-wise encoding would not be exact."""
        specials: dict[str, int] = {}
        for token_id, added in backend.get_added_tokens_decoder().items():
            if not added.special:
                continue
            if added.lstrip or added.rstrip or added.single_word or added.normalized:
                return None
            specials[added.content] = token_id
        if not specials:
            return None
        enc = cls(backend, specials, **kwargs)
        names = sorted(specials, key=len, reverse=True)
        a, b = names[0], names[-1]
        for probe in _PROBES:
            text = probe.format(a, b)
            whole = backend.encode(text, add_special_tokens=False).ids
            if enc._encode_uncached(text) != whole:
                return None
        return enc

    def _encode_uncached(self, text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        encode = self._encode_ids
        for m in self._pattern.finditer(text):
            if m.start() > pos:
                out.extend(encode(text[pos : m.start()], False))
            out.append(self._ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out.extend(encode(text[pos:], False))
        return out

    def _piece(self, piece: str) -> tuple[int, ...]:
        if len(piece) < self._min:
            # Short pieces are mostly the template's own text between special tokens
            # ("user\n", "\n"), the same in every request: a dict lookup instead of a call
            # into the tokenizer. Bounded by count; single dict operations need no lock.
            small = self._small
            ids = small.get(piece)
            if ids is None:
                ids = tuple(self._encode_ids(piece, False))
                if len(small) >= self._max_small:
                    small.clear()
                small[piece] = ids
            return ids
        ids = self._cached(piece)
        if ids is not None:
            return ids
        ids = tuple(self._encode_ids(piece, False))
        self._remember(piece, ids)
        return ids

    def _cached(self, piece: str) -> tuple[int, ...] | None:
        cache = self._cache
        with self._lock:
            ids = cache.get(piece)
            if ids is not None:
                cache.move_to_end(piece)
                self.hits += 1
            return ids

    def _remember(self, piece: str, ids: tuple[int, ...]) -> None:
        cache = self._cache
        with self._lock:
            self.misses += 1
            cost = _cost(piece, ids)
            if piece not in cache and cost <= self._max_bytes:
                cache[piece] = ids
                self._bytes += cost
                while self._bytes > self._max_bytes:
                    old, old_ids = cache.popitem(last=False)
                    self._bytes -= _cost(old, old_ids)

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        pos = 0
        ids = self._ids
        for m in self._pattern.finditer(text):
            if m.start() > pos:
                out.extend(self._piece(text[pos : m.start()]))
            out.append(ids[m.group()])
            pos = m.end()
        if pos < len(text):
            out.extend(self._piece(text[pos:]))
        return out

    def encode_bounded(self, text: str, budget: TokenBudget) -> list[int]:
        """:meth:`encode` within ``budget`` (the same ids, or the budget's exception soon
        after it is spent). A long piece is cached only when it was encoded whole."""
        out: list[int] = []
        pos = 0
        ids = self._ids
        for m in self._pattern.finditer(text):
            if m.start() > pos:
                self._piece_bounded(text[pos : m.start()], out, budget)
            out.append(ids[m.group()])
            pos = m.end()
        if pos < len(text):
            self._piece_bounded(text[pos:], out, budget)
        budget.check(len(out))
        return out

    def _piece_bounded(self, piece: str, out: list[int], budget: TokenBudget) -> None:
        if len(piece) < self._min:
            out += self._piece(piece)
            return
        ids = self._cached(piece)
        if ids is None:
            try:
                ids = tuple(self._encode_bounded(piece, budget.remaining(len(out))))
            except TokenLimitReached as exc:
                raise TokenLimitReached(len(out) + exc.count) from None
            self._remember(piece, ids)
        out += ids
        budget.check(len(out))
