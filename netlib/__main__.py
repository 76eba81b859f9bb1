"""``python -m netlib``: the netlib command line."""

import sys

from netlib.cli import main

sys.exit(main())
