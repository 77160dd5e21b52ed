"""`python -m safemerge_ray ...`: the CLI, for Ray job entrypoints that have the package but no script."""

import sys

from .cli import main

sys.exit(main())
