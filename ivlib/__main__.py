"""`python -m ivlib ...`: the same command as iv.py and the `ivlib` console script."""

import sys

from .entry import main

sys.exit(main())
