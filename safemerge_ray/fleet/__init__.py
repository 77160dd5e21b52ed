"""The fleet job on Ray: config -> plan -> workers score -> assemble -> gate -> commit.

    config  the fleet config (YAML), validated; importing it starts no Ray
    plan    what a run will do, from headers, pointers and manifests (AdapterState, plan_fleet, why_redo)
    jobs    the work units and results that travel between driver and workers, and the run's deadline
    worker  FleetWorker, the Ray actor: preflight, scoring (module-major), assembly (adapter-major)
    pool    the workers on Ray: their shape, start, preflight, memory check, and gathering of results
    run     run_fleet and score_fleet: the stages in order, under the output's lock, with a run record
    report  a run's outcome: exit status and the table a person reads
"""

from .config import AdapterRef, FleetConfig, load_config, parse_config, portable_config
from .plan import AdapterState, AdapterStatus, FleetPlan, plan_fleet, why_redo
from .report import FleetReport, exit_status, format_report
from .run import run_fleet, score_fleet

__all__ = [
    "AdapterRef", "AdapterState", "AdapterStatus", "FleetConfig", "FleetPlan", "FleetReport", "exit_status",
    "format_report", "load_config", "parse_config", "plan_fleet", "portable_config", "run_fleet", "score_fleet",
    "why_redo",
]
