"""``kvpick worker vllm|sglang|trtllm``: build the real engine's server command and exec it.

:func:`register` adds one subcommand per engine to ``kvpick worker``; each is an
:class:`~workers.launchers.common.EngineLauncher` defined in the engine's own module. Building
the parser imports no engine code (the engines need not be installed for ``--help`` or
``--dry-run``).
"""

from __future__ import annotations

import argparse

from workers.launchers import sglang, trtllm, vllm
from workers.launchers.common import EngineLauncher

LAUNCHERS: tuple[EngineLauncher, ...] = (vllm.LAUNCHER, sglang.LAUNCHER, trtllm.LAUNCHER)


def register(engines: argparse._SubParsersAction) -> None:
    """Add the ``vllm``, ``sglang`` and ``trtllm`` subparsers to ``engines``."""
    for launcher in LAUNCHERS:
        launcher.register(engines)
