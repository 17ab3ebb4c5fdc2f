#!/usr/bin/env python
"""Entry point: `python iv.py -c config/yours.yaml -m MODEL -t TASK ...` (see README.md)."""

import sys

from ivlib.cli import main

if __name__ == "__main__":
    sys.exit(main())
