"""`python -m ragcomp.train ...`: see `ragcomp.train.cli`."""

import sys

from ragcomp.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
