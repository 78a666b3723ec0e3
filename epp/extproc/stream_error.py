"""How a stream handler ends its stream with an error status of its own choosing."""

from __future__ import annotations

INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8


class StreamError(Exception):
    """Raised by a stream handler's ``handle``: the transport ends that stream (only that
    stream) with gRPC status ``code`` and the exception's message, closes the handler, and
    counts it in ``kvpick_extproc_streams_ended_by_epp{reason}``."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
