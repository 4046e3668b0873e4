"""``python -m mnc_d2.analyze``: kept for one release (CHANGELOG.md); the tool is :mod:`mnc_d2.tools.analyze`."""
import sys

from .tools.analyze import *  # noqa: F401,F403
from .tools.analyze import main

if __name__ == "__main__":
    sys.exit(main())
