"""`python -m safemerge_ray ...`: the CLI, for Ray job entrypoints that have the package but no script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
