"""`python -m baseq_export` runs the command line, as the `baseq-export` script does."""

import sys

from .cli import main

sys.exit(main())
