"""`python -m slimlm ...` runs the command line; torchrun starts each process this way (`torchrun -m slimlm`)."""

import sys

from slimlm.cli import main

sys.exit(main())
