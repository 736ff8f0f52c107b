"""``python -m adbench.benchmark.compare``: see the package docstring."""

import sys

from . import main

sys.exit(main())
