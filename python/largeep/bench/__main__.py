"""``python -m largeep.bench``: see :mod:`largeep.bench.cli`."""

import sys

from largeep.bench.cli import main

sys.exit(main())
