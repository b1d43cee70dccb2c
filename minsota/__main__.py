"""`python -m minsota` (also what `torchrun -m minsota` runs)."""

import sys

from minsota.cli import main

sys.exit(main())
