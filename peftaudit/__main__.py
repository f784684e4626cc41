"""``python -m peftaudit``: the same entry point as the console script."""

import sys

from peftaudit.cli import console_main

sys.exit(console_main())
