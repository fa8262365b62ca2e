"""``python -m omkd``: the same as the ``omkd`` command."""

import sys

from omkd.cli import main

sys.exit(main())
