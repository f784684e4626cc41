"""``python -m peftaudit``: the same entry point as the console script."""

import sys

from peftaudit.cli import main

sys.exit(main())
