"""``python -m sidecar …`` runs ``kvpick sidecar …``."""

import sys

from epp.cli import main

sys.exit(main(["sidecar", *sys.argv[1:]]))
