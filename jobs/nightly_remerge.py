"""Nightly fleet-wide re-merge, the entrypoint for `ray job submit`, KubeRay RayJob and RayCronJob:

    ray job submit --working-dir . -- python jobs/nightly_remerge.py --config FILE

Inside a Ray job the driver joins the job's cluster (RAY_ADDRESS is set by Ray). The process exits
with the fleet job's status (0 all usable, 3 some failed, 4 none usable, 2 bad config, 1 environment),
but Ray reports every non-zero status as a FAILED job: read the run record the job writes to
OUTPUT/status/last_run.json, or submit with `safemerge-ray submit`, which exits with the fleet's status.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working dir's package

from safemerge_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fleet", *sys.argv[1:]]))
