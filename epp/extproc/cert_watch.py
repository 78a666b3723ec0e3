"""``--enable-cert-reload``: serve new certificates from ``--cert-path`` without a restart.

The watcher polls ``tls.crt`` and ``tls.key`` every ``interval`` seconds. It compares what
``stat`` says after following symlinks (device, inode, size, mtime), so the atomic
``..data`` symlink swap Kubernetes does for a mounted Secret counts as a change. A change is
applied only when both files read, parse and match each other. A half-written pair is
retried at the next poll, and the certificate being served stays in place meanwhile.
Connections already open keep the certificate they were made with.

Other files can be watched with the pair (``also``: the ``--client-ca`` bundle); a change to
any of them applies all of them together, through the same ``apply``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from epp.extproc import tls

log = logging.getLogger(__name__)

Apply = Callable[[bytes, bytes], None]
"""Takes ``(key PEM, certificate PEM)`` and starts serving them; raises when it cannot."""

DEFAULT_INTERVAL = 2.0


Fingerprint = tuple[tuple[int, int, int, int], ...]


def fingerprint(directory: str | Path, also: Sequence[str | Path] = ()) -> Fingerprint | None:
    """What ``stat`` says of the pair and of the files ``also`` (after following
    symlinks); None if one is missing."""
    directory = Path(directory)
    out = []
    for path in (directory / "tls.crt", directory / "tls.key", *map(Path, also)):
        try:
            st = os.stat(path)
        except OSError:
            return None
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class CertWatcher:
    """Polls ``cert_dir`` and calls ``apply`` with each new valid key and certificate."""

    def __init__(
        self,
        cert_dir: str | Path,
        apply: Apply,
        interval: float = DEFAULT_INTERVAL,
        *,
        seen: Fingerprint | None = None,
        also: Sequence[str | Path] = (),
    ) -> None:
        """``seen``: the fingerprint taken before the pair being served was read (so that a
        change during that read is not missed); by default, the files as they are now.
        ``also``: more files whose change means reloading (``apply`` reads them itself)."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.directory = Path(cert_dir)
        self.also = tuple(Path(p) for p in also)
        self.interval = interval
        self.reloads = 0  # certificates applied since start, for tests and logs
        self._apply = apply
        self._seen = seen if seen is not None else fingerprint(self.directory, self.also)
        self._refused: Fingerprint | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cert-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    def check(self) -> bool:
        """Apply the files if they changed and are valid; True when a new pair was applied."""
        # Taken before reading, so that a change made while the files are read shows as a
        # new fingerprint at the next poll.
        now = fingerprint(self.directory, self.also)
        if now is None or now == self._seen or now == self._refused:
            return False
        try:
            key, cert = tls.load(self.directory)
            self._apply(key, cert)
        except Exception as exc:  # mid-update or broken: keep serving the old pair
            # Said once per state of the files; the next change is tried afresh.
            self._refused = now
            log.warning("certificates in %s changed but cannot be used (%s); still "
                        "serving the previous ones", self.directory, exc)  # fmt: skip
            return False
        self._seen = now
        self.reloads += 1
        log.info("serving the new certificate from %s", self.directory)
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check()
            except Exception:
                log.exception("certificate reload check failed")
