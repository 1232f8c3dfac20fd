"""`python -m analysis` runs the `attnscope` command."""

import sys

from .cli import main

sys.exit(main())
