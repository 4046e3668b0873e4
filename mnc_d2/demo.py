"""``python -m mnc_d2.demo``: kept for one release (CHANGELOG.md); the tool is :mod:`mnc_d2.tools.demo`."""
import sys

from .tools.demo import *  # noqa: F401,F403
from .tools.demo import main

if __name__ == "__main__":
    main(sys.argv[1:])
