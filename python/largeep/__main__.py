"""``python -m largeep``: the environment report of :mod:`largeep.info`."""

import sys

from largeep.info import main

sys.exit(main())
