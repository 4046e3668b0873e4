"""``python -m mnc_d2.export``: kept for one release (CHANGELOG.md); the tool is :mod:`mnc_d2.tools.export`."""
import sys

from .tools.export import *  # noqa: F401,F403
from .tools.export import main

if __name__ == "__main__":
    sys.exit(main())
