"""``python -m accounting``: see :mod:`accounting.cli`."""

import sys

from accounting.cli import main

sys.exit(main())
