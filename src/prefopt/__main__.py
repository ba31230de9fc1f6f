"""`python -m prefopt ...` is the `prefopt` command."""

import sys

from .cli import main

sys.exit(main())
