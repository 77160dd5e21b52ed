"""Nightly fleet-wide re-merge, for `ray job submit`:

    ray job submit --working-dir . -- python jobs/nightly_remerge.py --config FILE

Inside a Ray job the driver joins the job's cluster (RAY_ADDRESS is set by Ray). The exit status is
the fleet job's: 0 done, 2 bad config or shared input, 3 partial, 4 every adapter failed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir's package

from safemerge_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fleet", *sys.argv[1:]]))
