"""How much tokenizing one request may cost: a token limit and a deadline.

Encoders that take a :class:`TokenBudget` check it as they go (every few hundred words, and
between pieces) and stop as soon as it is spent, so that a prompt far longer than the
model's context is refused after tokenizing just past the limit, not in full, and no
request keeps a preprocessing thread past its time. Checks cost a comparison; a budget is
never checked more than once per :data:`CHECK_EVERY` words plus once per piece, so an
encoder may overshoot the limit by at most that many words' ids before it notices.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

CHECK_EVERY = 256
"""Words encoded between two budget checks."""


class TokenLimitReached(Exception):
    """More than the budget's ``limit`` ids were produced; ``count`` is how many (a lower
    bound of the whole text's count, since encoding stopped there)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"more than the limit: {count} token ids so far")
        self.count = count


class DeadlineReached(TimeoutError):
    """The budget's deadline passed while encoding."""


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """``limit``: the most ids an encoding may produce (None: any number); ``deadline``: a
    :func:`time.monotonic` reading after which encoding stops (None: no deadline);
    ``cancelled``: set by another thread when the result is no longer wanted."""

    limit: int | None = None
    deadline: float | None = None
    cancelled: threading.Event | None = None

    @property
    def bounded(self) -> bool:
        """Whether checking this budget can ever stop an encoding."""
        return self.limit is not None or self.deadline is not None or self.cancelled is not None

    def check(self, count: int) -> None:
        """Raise :class:`TokenLimitReached` when ``count`` ids pass the limit, and
        :class:`DeadlineReached` when the deadline has passed or the work was cancelled."""
        if self.limit is not None and count > self.limit:
            raise TokenLimitReached(count)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineReached("tokenizing took longer than its time budget")
        if self.cancelled is not None and self.cancelled.is_set():
            raise DeadlineReached("the request went away while it was tokenized")

    def remaining(self, used: int) -> TokenBudget:
        """The budget left after ``used`` ids (for encoding the next piece on its own)."""
        if self.limit is None:
            return self
        return TokenBudget(self.limit - used, self.deadline, self.cancelled)

    def unlimited(self) -> TokenBudget:
        """This budget without its token limit (its deadline and cancellation kept)."""
        return TokenBudget(None, self.deadline, self.cancelled)


UNLIMITED = TokenBudget()
