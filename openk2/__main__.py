"""`python -m openk2 ...`: the same command as the `openk2` console script."""

import sys

from openk2.cli import main

sys.exit(main())
