"""`python -m mmalign ...` (and `accelerate launch -m mmalign ...`) runs the command-line interface."""

import sys

from mmalign.cli import main

sys.exit(main())
