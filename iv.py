#!/usr/bin/env python
"""Entry point: `python iv.py -c config/yours.yaml -m MODEL -t TASK ...` (see README.md)."""

import sys

try:  # Ctrl-C in the first milliseconds, before ivlib.entry has its handlers in place
    from ivlib.entry import main
except KeyboardInterrupt:
    print("iv.py: interrupted (SIGINT) during start-up; nothing written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
