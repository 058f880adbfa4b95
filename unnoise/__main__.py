"""``python -m unnoise``: the command line (:mod:`unnoise.cli`)."""

import sys

from unnoise.cli import main

sys.exit(main())
