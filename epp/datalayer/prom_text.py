"""A parser for the Prometheus text exposition format (v0.0.4), tuned for scraping model servers.

:func:`parse` returns the samples of the metric names it is asked for, in text order, and a
count of the lines it had to skip. Guarantees:

* It never raises on any input string; a line it cannot read is skipped and counted in
  :attr:`ParseResult.bad_lines`.
* ``# HELP`` / ``# TYPE`` lines and other comments produce no samples. Histogram and summary
  series (``_bucket``, ``_sum``, ``_count``, quantiles) come through as ordinary samples under
  their own sample names.
* Label values are unescaped (``\\\\``, ``\\"``, ``\\n``; any other backslash pair is kept as
  written). ``NaN``, ``+Inf`` and ``-Inf`` values are floats. A timestamp (integer
  milliseconds) is returned in seconds, like ``prometheus_client``'s parser does.
* With ``wanted``, only lines whose metric name is in ``wanted`` are read at all: the samples
  are exactly the unfiltered samples whose name is in ``wanted``, and ``bad_lines`` counts
  only the unreadable lines that start with a wanted name. Without ``wanted`` every line is
  read and checked.

Why the ``wanted`` path is fast: vLLM's ``/metrics`` runs to hundreds of histogram lines and
the EPP reads it every 50 ms per endpoint, while it needs a handful of gauges. Each wanted
name is located with ``str.find`` (C speed, no per-line Python work); an occurrence counts
when only blanks precede it on its line and no name character follows it, and only those
lines are split and parsed. Lines are ``\\n``-separated and the format escapes newlines in
label values and help text, so this finds exactly the lines a line-by-line reading would.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:")
_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# One `name="value"` pair and the separator after it. The value is any run of characters
# other than `"` and `\`, or backslash pairs, so an escaped quote does not end it.
_LABEL_RE = re.compile(
    r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"([^"\\]*(?:\\.[^"\\]*)*)"[ \t]*([,}])'
)
_CLOSE_RE = re.compile(r"[ \t]*\}")
_BRACE_RE = re.compile(r"[ \t]*\{")
_ESCAPE_RE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_NO_LABELS: Mapping[str, str] = MappingProxyType({})
# Label sets parsed before, by their exact text. A model server repeats the same label sets
# scrape after scrape (only values change), so most lines skip label parsing. The parsed
# sets are read-only, which is what makes sharing them between samples safe. Cleared when
# full: cheaper than LRU bookkeeping, and refilled within one scrape. Long blocks are not
# kept, so the cache stays small whatever a server sends (real ones are a few hundred bytes).
_LABEL_CACHE: dict[str, Mapping[str, str]] = {}
_LABEL_CACHE_SIZE = 4096
_LABEL_CACHE_KEY_MAX = 1024
# Milliseconds in an int64, which also keeps int() clear of its digit-count limit.
_TIMESTAMP_RE = re.compile(r"[+-]?[0-9]{1,19}")
# What is stripped from both ends of a line (CRLF line ends, indentation).
_STRIP = " \t\r"


@dataclass(frozen=True, slots=True)
class Sample:
    """One sample line. ``labels`` is read-only (label sets are shared between samples);
    ``timestamp`` is in seconds (the text carries milliseconds)."""

    name: str
    labels: Mapping[str, str]
    value: float
    timestamp: float | None = None


@dataclass(slots=True)
class ParseResult:
    """The samples read, in text order, and how many lines were skipped as unreadable."""

    samples: list[Sample]
    bad_lines: int = 0


def parse(text: str, wanted: frozenset[str] | None = None) -> ParseResult:
    """Parse an exposition; with ``wanted``, only samples named in it (see the module doc)."""
    if wanted is None:
        return _parse_lines(text)
    if not wanted or not text:
        return ParseResult([])
    return _parse_located(text, wanted)


def _parse_located(text: str, wanted: frozenset[str]) -> ParseResult:
    size = len(text)
    hits: list[tuple[int, int, str]] = []
    for name in wanted:
        n = len(name)
        if not n:
            continue
        i = text.find(name)
        while i != -1:
            end = i + n
            stop = text.find("\n", end)
            if stop == -1:
                stop = size
            # A wanted line starts with the whole name: `foo` must not pick up `foo_bucket`
            # lines, nor a `foo` inside a HELP line or a label value.
            if end >= size or text[end] not in _NAME_CHARS:
                start = text.rfind("\n", 0, i) + 1
                if start == i or not text[start:i].strip(_STRIP):
                    hits.append((start, stop, name))
            # Only the first occurrence on a line can start it, so the search goes on from
            # the next line: every character is looked at once per name, even in garbage.
            i = text.find(name, stop)
    hits.sort()
    samples: list[Sample] = []
    bad = 0
    for start, stop, name in hits:
        sample = _parse_sample(text[start:stop].strip(_STRIP), name)
        if sample is None:
            bad += 1
        else:
            samples.append(sample)
    return ParseResult(samples, bad)


def _parse_lines(text: str) -> ParseResult:
    samples: list[Sample] = []
    bad = 0
    for raw in text.split("\n"):
        line = raw.strip(_STRIP)
        if not line:
            continue
        if line[0] == "#":
            if not _comment_ok(line):
                bad += 1
            continue
        match = _NAME_RE.match(line)
        sample = None if match is None else _parse_sample(line, match.group())
        if sample is None:
            bad += 1
        else:
            samples.append(sample)
    return ParseResult(samples, bad)


def _comment_ok(line: str) -> bool:
    """A ``# HELP`` line needs a metric name, a ``# TYPE`` line a name and a type; any
    other comment is free text."""
    parts = line.split(None, 3)
    if len(parts) < 2 or parts[0] != "#" or parts[1] not in ("HELP", "TYPE"):
        return True
    if len(parts) < 3 or _NAME_RE.fullmatch(parts[2]) is None:
        return False
    return parts[1] == "HELP" or len(parts) == 4


def _parse_sample(line: str, name: str) -> Sample | None:
    """Read one stripped sample line whose metric name (``name``) starts it; None if the
    rest of the line is not valid."""
    pos = len(name)
    if pos >= len(line):
        return None
    char = line[pos]
    if char in " \t":
        # Blanks may separate the name from its label set.
        brace = _BRACE_RE.match(line, pos)
        if brace is not None:
            pos, char = brace.end() - 1, "{"
    labels = _NO_LABELS
    if char == "{":
        # The label set ends at the line's last brace: only the value and the timestamp,
        # which cannot contain one, may follow it.
        end = line.rfind("}") + 1
        if end <= pos:
            return None
        block = line[pos:end]
        cached = _LABEL_CACHE.get(block)
        if cached is None:
            cached = _parse_labels(block)
            if cached is None:
                return None
            if len(block) <= _LABEL_CACHE_KEY_MAX:
                if len(_LABEL_CACHE) >= _LABEL_CACHE_SIZE:
                    _LABEL_CACHE.clear()
                _LABEL_CACHE[block] = cached
        labels = cached
        pos = end
    elif char not in " \t":
        return None
    tokens = line[pos:].split()
    if not tokens or len(tokens) > 2:
        return None
    value = _parse_float(tokens[0])
    if value is None:
        return None
    timestamp: float | None = None
    if len(tokens) == 2:
        if _TIMESTAMP_RE.fullmatch(tokens[1]) is None:
            return None
        timestamp = int(tokens[1]) / 1000
    return Sample(name, labels, value, timestamp)


def _parse_labels(block: str) -> Mapping[str, str] | None:
    """The labels of a whole ``{...}`` block; None unless the block is exactly a valid
    label set."""
    close = _CLOSE_RE.match(block, 1)
    if close is not None:
        return _NO_LABELS if close.end() == len(block) else None
    labels: dict[str, str] = {}
    pos = 1
    while True:
        match = _LABEL_RE.match(block, pos)
        if match is None:
            return None
        key, value, sep = match.groups()
        if key in labels:
            return None
        if "\\" in value:
            value = _ESCAPE_RE.sub(_unescape, value)
        labels[key] = value
        pos = match.end()
        if sep == "}":
            break
        # A trailing comma before the brace is allowed.
        close = _CLOSE_RE.match(block, pos)
        if close is not None:
            pos = close.end()
            break
    return MappingProxyType(labels) if pos == len(block) else None


def _unescape(match: re.Match[str]) -> str:
    char = match.group(1)
    return _ESCAPES.get(char, match.group(0))


def _parse_float(token: str) -> float | None:
    # Python's float() also takes digit separators ("1_0"), which the format does not.
    if "_" in token:
        return None
    try:
        return float(token)
    except ValueError:
        return None
