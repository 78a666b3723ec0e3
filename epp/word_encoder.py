"""Word-by-word encoding with a cache, for byte-level BPE tokenizers.

In a byte-level BPE tokenizer (GPT-2's family: Llama 3, Qwen, Mistral's Tekken, DeepSeek,
...) the pre-tokenizer cuts the text into words with one regular expression, and the BPE
model encodes each word on its own: no token ever spans two words. So a text's ids are the
concatenation of its words' ids, and a word seen before needs no BPE work at all. User turns
are made of common words, so after warm-up nearly every word is a dict lookup, and encoding
a 100-word turn drops from a couple of hundred microseconds in the library to a few tens.

:meth:`WordEncoder.for_backend` builds one only for the tokenizer shapes where this is exact:

* no normalizer, or NFC;
* pre-tokenizer ``ByteLevel(add_prefix_space=False, use_regex=True)`` (GPT-2's expression),
  or ``Sequence([Split(Regex(p), "Isolated"), ByteLevel(add_prefix_space=False,
  use_regex=False)])`` (Llama 3's and Qwen's layout, with their own expression ``p``);
* a BPE model without dropout;
* added tokens without lstrip/rstrip/single_word/normalized flags (they are cut out of the
  text first, as the library does).

It then checks itself against the library on probe texts and declines on any difference.
Unknown words are encoded by the library itself (its byte-level map and BPE model), so the
only thing reimplemented here is the word cutting, done with the same expression.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any

import regex
import tokenizers
from tokenizers import pre_tokenizers

from epp.token_budget import CHECK_EVERY, TokenBudget

log = logging.getLogger(__name__)

_category = unicodedata.category
_has_digit = re.compile(r"\d").search

MAX_CACHED_WORD = 64
"""Longer words are encoded every time: with :attr:`WordEncoder` ``max_words`` entries at
most (32768 by default: a language's common words), this bounds the cache to under ten
megabytes, which a soak's unending stream of new words (ids, numbers, names) fills once."""

# The expression HF's ByteLevel pre-tokenizer uses with use_regex=True (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Texts that exercise the expressions' corners: contractions, digit runs, whitespace runs
# before words and at the end, newlines, tabs, non-Latin scripts, combining marks, emoji.
PROBES = (
    "Hello world! It's a test; we'll see, they'd've DONE it.",
    "  two  spaces   three\tTab\n\nnewlines \n \n trailing   ",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10 0x1F",
    "ünïcödé café naïve Ελληνικά русский 中文字符 日本語 한국어 עברית العربية",
    "e\u0301 a\u0308 combining, emoji 👋🏽 🇫🇷 zero\u200bwidth",
    "code: def f(x):\n    return x**2  # comment\r\n\tindented",
    "''quotes'' \"double\" `back` 'S 'T 'RE mixed'Ll CASE'D",
    "punct!!! ??? ... --- *** ((( ))) [[[ ]]] {{{ }}}",
)


class WordEncoder:
    """``encode(text) == backend.encode(text, add_special_tokens=False).ids`` (see the
    module docstring for when this holds; :meth:`for_backend` decides)."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        pattern: str,
        *,
        nfc: bool,
        added: dict[str, int],
        normalized: frozenset[str] = frozenset(),
        max_words: int = 1 << 15,
    ) -> None:
        """``added``: every added token's content and id; ``normalized``: the contents of
        those the library matches only in what the others leave (its second pass)."""
        self._model = backend.model
        self._words = regex.compile(pattern)
        self._bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._nfc = nfc
        self._added = added
        self._first = _alternation(t for t in added if t not in normalized)
        self._second = _alternation(t for t in added if t in normalized)
        # Tuples, not lists: untracked by the garbage collector (see token_segments).
        self._cache: dict[str, tuple[int, ...]] = {}
        self._library = backend.encode
        self._max_words = max_words
        self._lock = threading.Lock()

    @classmethod
    def for_backend(cls, backend: tokenizers.Tokenizer, **kwargs: Any) -> WordEncoder | None:
        """An encoder for ``backend``, or None (with a DEBUG log saying why) when word-wise
        encoding would not be exact."""
        reason, enc = cls._build(backend, **kwargs)
        if enc is None:
            log.debug("word cache not used for this tokenizer: %s", reason)
        return enc

    @classmethod
    def _build(cls, backend: tokenizers.Tokenizer, **kwargs: Any) -> tuple[str, WordEncoder | None]:
        if getattr(backend, "encode_special_tokens", False):
            return "special tokens are encoded as text", None
        spec = json.loads(backend.to_str())
        normalizer = spec.get("normalizer")
        if normalizer is not None and normalizer.get("type") != "NFC":
            return f"normalizer {normalizer.get('type')}", None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
            return "the model is not a deterministic BPE", None
        pattern = _word_pattern(spec.get("pre_tokenizer"))
        if pattern is None:
            return f"pre-tokenizer {spec.get('pre_tokenizer')}", None
        added: dict[str, int] = {}
        normalized: set[str] = set()
        for token_id, tok in backend.get_added_tokens_decoder().items():
            if tok.lstrip or tok.rstrip or tok.single_word:
                return f"added token {tok.content!r} has strip/word flags", None
            if tok.normalized and normalizer is not None:
                return f"added token {tok.content!r} is matched after normalization", None
            added[tok.content] = token_id
            if tok.normalized:
                normalized.add(tok.content)
        try:
            enc = cls(
                backend,
                pattern,
                nfc=normalizer is not None,
                added=added,
                normalized=frozenset(normalized),
                **kwargs,
            )
        except regex.error as exc:
            return f"its expression does not compile here: {exc}", None
        names = sorted(added, key=len)
        for probe in PROBES:
            texts = [probe]
            if names:
                texts.append(f"{names[-1]}{probe[:20]}{names[0]} {probe[20:]}{names[-1]}")
            for text in texts:
                if enc.encode(text) != backend.encode(text, add_special_tokens=False).ids:
                    return f"it differs from the library on {text[:40]!r}", None
        enc._cache.clear()  # the probes' words are not worth keeping
        return "", enc

    # ---------------------------------------------------------------- encoding

    def _word(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        if not word:
            return ()  # an expression that can match nothing yields empty words
        # The library's own byte-level map and BPE model: one pre-token, no splitting.
        mapped = self._bytes.pre_tokenize_str(word)[0][0]
        ids = tuple([t.id for t in self._model.tokenize(mapped)])
        if len(word) > MAX_CACHED_WORD or (len(word) > 3 and _has_digit(word)):
            # Long "words" (base64, hex) and numbers are mostly seen once: caching them
            # would only churn the cache (a request counter alone adds one per request).
            return ids
        with self._lock:
            if len(self._cache) >= self._max_words:
                self._cache.clear()  # rare: a vocabulary's worth of distinct words
            self._cache[word] = ids
        return ids

    def _plain(self, text: str) -> list[int]:
        """Text without added tokens."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        words = self._words.findall(text)
        if sum(map(len, words)) != len(text):
            words = self._isolated(text)  # the expression left gaps: keep them as words
        out: list[int] = []
        cache = self._cache
        for word in words:
            ids = cache.get(word)
            out += ids if ids is not None else self._word(word)
        return out

    def _isolated(self, text: str) -> list[str]:
        words: list[str] = []
        pos = 0
        for m in self._words.finditer(text):
            if m.start() > pos:
                words.append(text[pos : m.start()])
            if m.end() > m.start():
                words.append(m.group())
            pos = m.end()
        if pos < len(text):
            words.append(text[pos:])
        return words

    def encode(self, text: str) -> list[int]:
        if newer_unicode(text):
            return self._library(text, add_special_tokens=False).ids
        # As the library: tokens matched on the raw text first, normalized ones in the gaps.
        return self._cut(text, self._first, self._in_gap)

    def encode_bounded(self, text: str, budget: TokenBudget) -> list[int]:
        """:meth:`encode` within ``budget``: the same ids, or
        :class:`~epp.token_budget.TokenLimitReached` /
        :class:`~epp.token_budget.DeadlineReached` soon after the budget is spent. Words are
        found one at a time, so a long text never becomes a list of all its words.

        Text with code points newer than Python's tables goes to the library whole, as in
        :meth:`encode`; the caller bounds its length (the EPP's character bound does).
        """
        if newer_unicode(text):
            ids = self._library(text, add_special_tokens=False).ids
            budget.check(len(ids))
            return ids
        out: list[int] = []

        def plain(part: str) -> None:
            self._plain_into(part, out, budget)

        def gap(part: str) -> None:
            self._cut_into(part, self._second, plain, out)

        self._cut_into(text, self._first, gap, out)
        budget.check(len(out))
        return out

    def _cut_into(
        self,
        text: str,
        tokens: regex.Pattern[str] | None,
        rest: Callable[[str], None],
        out: list[int],
    ) -> None:
        if tokens is None:
            rest(text)
            return
        pos = 0
        for m in tokens.finditer(text):
            if m.start() > pos:
                rest(text[pos : m.start()])
            out.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            rest(text[pos:])

    def _plain_into(self, text: str, out: list[int], budget: TokenBudget) -> None:
        """:meth:`_plain` appending to ``out``, checking ``budget`` as it goes."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        cache = self._cache
        word_ids = self._word
        pos = 0
        for n, m in enumerate(self._words.finditer(text), 1):
            start, end = m.span()
            if start > pos:  # a gap the expression left: it is a word of its own
                out += word_ids(text[pos:start])
            if end > start:
                word = m.group()
                ids = cache.get(word)
                out += ids if ids is not None else word_ids(word)
            pos = end
            if n % CHECK_EVERY == 0:
                budget.check(len(out))
        if pos < len(text):
            out += word_ids(text[pos:])

    def _in_gap(self, text: str) -> list[int]:
        return self._cut(text, self._second, self._plain)

    def _cut(
        self, text: str, tokens: regex.Pattern[str] | None, rest: Callable[[str], list[int]]
    ) -> list[int]:
        if tokens is None:
            return rest(text)
        out: list[int] = []
        pos = 0
        for m in tokens.finditer(text):
            if m.start() > pos:
                out += rest(text[pos : m.start()])
            out.append(self._added[m.group()])
            pos = m.end()
        if pos < len(text):
            out += rest(text[pos:])
        return out


def _alternation(contents: Iterable[str]) -> regex.Pattern[str] | None:
    ordered = sorted(contents, key=len, reverse=True)  # the longest match wins
    return regex.compile("|".join(regex.escape(c) for c in ordered)) if ordered else None


def newer_unicode(text: str) -> bool:
    """Whether ``text`` holds a code point this Python's Unicode tables leave unassigned.

    The ``regex`` module often knows a newer Unicode version than the tokenizers library
    does, so the two can classify such characters differently (a letter to one, unassigned
    to the other); texts that hold any go to the library. ASCII text is answered at once;
    otherwise each distinct non-ASCII character is looked up once.
    """
    if text.isascii():
        return False
    return any(_category(c) == "Cn" for c in set(text) if c > "\x7f")


def _word_pattern(pre: dict[str, Any] | None) -> str | None:
    """The word-cutting expression of a supported pre-tokenizer layout, else None."""
    if pre is None:
        return None

    def byte_level(p: dict[str, Any], use_regex: bool) -> bool:
        return (
            p.get("type") == "ByteLevel"
            and not p.get("add_prefix_space", False)
            and bool(p.get("use_regex", True)) is use_regex
        )

    if byte_level(pre, True):
        return GPT2_PATTERN
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers") or []
    if len(parts) != 2 or not byte_level(parts[1], False):
        return None
    split = parts[0]
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert", False)
        or "Regex" not in (split.get("pattern") or {})
    ):
        return None
    return str(split["pattern"]["Regex"])


def word_ids_encoder(backend: tokenizers.Tokenizer) -> Callable[[str], list[int]] | None:
    """``backend``'s ``add_special_tokens=False`` encoding through a :class:`WordEncoder`,
    or None when that would not be exact."""
    enc = WordEncoder.for_backend(backend)
    return enc.encode if enc is not None else None
