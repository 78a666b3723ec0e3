"""``python -m epp …`` runs ``kvpick epp …``."""

import sys

from epp.command import run

sys.exit(run(sys.argv[1:]))
