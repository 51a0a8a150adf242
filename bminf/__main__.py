"""``python -m bminf ...``: the command line of ``bminf.cli``."""
import sys

from bminf.cli import main

if __name__ == "__main__":
    sys.exit(main())
