"""`python -m blipkit.cli`: the `blipkit` command."""

import sys

from . import main

sys.exit(main())
