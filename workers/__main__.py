"""``python -m workers …`` runs ``kvpick worker …``."""

import sys

from epp.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
