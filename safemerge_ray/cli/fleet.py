"""`safemerge-ray fleet`, `submit` and `sweep`: the fleet job, here or on a cluster, and choosing tau for it."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import replace

from ..errors import ExitStatus, SafeMergeError
from ..service import add_service_flags, with_flags
from .records import emit_record, error_record, json_arg


def _taus(text: str) -> list[float]:
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            return [round(start + i * step, 10) for i in range(count) if start + i * step <= stop + 1e-9]
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:STOP:STEP like 0.1:0.9:0.05, or 0.2,0.35; got {text!r}") from None



def add_parsers(sub) -> None:
    f = sub.add_parser("fleet", help="repair every fine-tune of a fleet config on Ray (starts or joins Ray)")
    f.add_argument("--config", required=True, help="fleet config YAML")
    f.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, a local `ray start`, or a new local Ray)")
    f.add_argument("--quiet", action="store_true", help="no progress lines, and none of Ray's own log lines")
    f.add_argument("--log-format", choices=("auto", "text", "json"), default="auto",
                   help="json: one JSON object per line for every message, progress step and adapter outcome, "
                        "with the run id (for log pipelines); text: lines and a table for people; auto (default): "
                        "text on a terminal, json otherwise")
    f.add_argument("--summary-json", metavar="FILE", default=None,
                   help="also write the run record (the same as OUTPUT/status/last_run.json) to FILE")
    f.add_argument("--runtime-env-json", metavar="JSON", default=None,
                   help="Ray runtime env for the workers, e.g. '{\"env_vars\": {...}}' (see README: credentials)")

    f.add_argument("--dry-run", action="store_true",
                   help="plan and print what would be redone and why; start no Ray, write nothing")
    f.add_argument("--verify-published", action="store_true",
                   help="re-read and re-hash every published adapter this run would leave unchanged, and redo what "
                        "differs (the nightly check compares version tags only; see verify_published)")
    f.add_argument("--break-lock", action="store_true",
                   help="take the output's run lock even if another run's lease is still valid (operators only)")
    f.add_argument("--record-line", action="store_true", help=argparse.SUPPRESS)  # for `submit`: see RECORD_LINE
    add_service_flags(f)

    f.set_defaults(func=cmd_fleet)

    j = sub.add_parser("submit", help="submit the fleet job to a Ray cluster's job API, wait, exit with its status")
    j.add_argument("--config", required=True, help="fleet config YAML (read and checked here; paths made absolute)")
    j.add_argument("--address", default=None,
                   help="the cluster's dashboard/job API (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    j.add_argument("--runtime-env-json", metavar="JSON", default=None,
                   help="extra Ray runtime env for the job and its workers (env_vars, pip); see README: credentials")
    j.add_argument("--env", metavar="NAME", action="append", default=[],
                   help="pass this shell's value of NAME to the job and its workers (repeatable), e.g. --env "
                        "AWS_ACCESS_KEY_ID; see README: credentials")
    j.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the job and exit 1 if it has not ended by then (default: wait)")
    j.add_argument("--summary-json", metavar="FILE", default=None, help="write the job's run record to FILE")
    j.add_argument("--quiet", action="store_true", help="do not stream the job's log")
    j.add_argument("--break-lock", action="store_true", help="passed to the job: see `fleet --break-lock`")
    j.set_defaults(func=cmd_submit)

    w = sub.add_parser("sweep", help="score the fleet once and print how many layers each tau would repair "
                                     "(and rho's quantiles); writes nothing")
    w.add_argument("config", help="fleet config YAML")
    w.add_argument("--tau", type=_taus, default=_taus("0.1:0.9:0.05"), metavar="START:STOP:STEP",
                   help="the taus to try, START to STOP inclusive (default 0.1:0.9:0.05), or a list like 0.2,0.35,0.5")
    w.add_argument("--address", default=None, help="Ray cluster to join (as for fleet)")
    w.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default): per adapter and in total, for people; json: the same numbers")
    w.add_argument("--quiet", action="store_true", help="no progress lines, and none of Ray's own log lines")
    w.set_defaults(func=cmd_sweep)


def cmd_fleet(args: argparse.Namespace) -> int:
    from ..fleet import format_report, load_config, run_fleet
    from ..progress import configure
    from ..store import RunRecord, utc_now

    if args.log_format == "auto":
        args.log_format = "text" if sys.stdout.isatty() else "json"
    configure(args.log_format)
    started = utc_now()
    if args.dry_run:
        return _dry_run(load_config(args.config))

    def failed(exc: BaseException, status: int) -> None:
        """The record the fleet job wrote, or (it never got that far) one saying why."""
        record = getattr(exc, "run_record", None)
        if not isinstance(record, RunRecord):
            record = error_record(started, args.config, exc, status)
        emit_record(record.to_dict(), args.summary_json, args.record_line)

    try:
        runtime_env = json_arg(args.runtime_env_json, "--runtime-env-json")
        config = load_config(args.config)
        if args.verify_published:
            config = replace(config, verify_published="always")
        metrics, tracking = with_flags(config.metrics, config.tracking, args)
        config = replace(config, metrics=metrics, tracking=tracking)
        report = run_fleet(config, progress=not args.quiet, ray_address=args.address, runtime_env=runtime_env,
                           break_lock=args.break_lock)
    except SafeMergeError as exc:
        failed(exc, exc.exit_code)
        raise
    except KeyboardInterrupt as exc:
        failed(exc, ExitStatus.INTERRUPTED)
        raise
    if args.log_format == "json":
        _log_outcomes(report)
    else:
        print(format_report(report))
        for line in _reported_to(config, report.record):
            print(line)
    assert report.record is not None
    emit_record(report.record.to_dict(), args.summary_json, args.record_line)
    return report.exit_code


def _reported_to(config, record) -> list[str]:
    """Where the run's metrics and tracked run went (a failure to get there is among the warnings)."""
    lines = []
    if config.metrics and not any(w.startswith("metrics:") for w in record.warnings):
        groups = ", ".join(f"{k}={v}" for k, v in {"job": config.metrics.job, "command": "fleet",
                                                   **config.metrics.grouping}.items())
        lines.append(f"metrics: pushed to {config.metrics.pushgateway} ({groups})")
    if config.tracking and record.tracked_run:
        lines.append(f"tracking: MLflow run {record.tracked_run} in experiment {config.tracking.experiment!r} at "
                     f"{config.tracking.mlflow}")
    return lines


def _dry_run(config) -> int:
    from ..fleet import AdapterStatus, plan_fleet
    from ..io import open_dir
    from ..store import NextRun

    plan = plan_fleet(config, open_dir(config.output, what="output", s3=config.s3, must_exist=False))
    print(f"{'adapter':<20} {'would be':<10} why")
    next_runs = plan.next_runs()
    for st in plan.states:
        planned = next_runs[st.ref.name]
        detail = f"run {st.previous_run}" if planned.next == NextRun.UNCHANGED else planned.detail
        print(f"{st.ref.name:<20} {planned.next:<10} {detail}")
    for w in plan.warnings:
        print(f"warning: {w}")
    print(f"dry run: {len(plan.pending)} to redo, {len(plan.by_status(AdapterStatus.UNCHANGED))} unchanged, "
          f"{len(plan.by_status(AdapterStatus.FAILED))} invalid; nothing was started or written")
    return ExitStatus.OK


def _log_outcomes(report) -> None:
    """One JSON line per adapter (status, layers repaired, why it was redone or why it failed), then the run's."""
    from ..fleet import AdapterStatus
    from ..progress import log

    shown, left_out = report.listed()  # bounded as the table is: all of them are in the run's summary
    for st in shown:
        fields = {"adapter": st.ref.name, "status": str(st.status)}
        if st.counts:
            fields.update(repaired=st.counts["repaired"], modules=st.counts["modules"])
        if st.why and st.status == AdapterStatus.COMMITTED:
            fields["why"] = st.why
        if st.status == AdapterStatus.FAILED:
            fields["reason"] = st.reason
        if st.status == AdapterStatus.UNCHANGED:
            fields["published_run"] = st.previous_run
        log("adapter", f"{st.ref.name}: {st.status}", **fields)
    log("run", f"exit status {report.exit_code}", exit_status=report.exit_code, warnings=report.warnings[:100],
        output=report.output, counts=report.record.counts if report.record else None,
        failed_not_listed=left_out)



def cmd_submit(args: argparse.Namespace) -> int:
    from ..store import utc_now
    from .submit import submit_fleet

    started = utc_now()
    try:
        runtime_env = json_arg(args.runtime_env_json, "--runtime-env-json") or {}
        missing = [name for name in args.env if name not in os.environ]
        if missing:
            raise SafeMergeError(f"--env: {', '.join(missing)} not set in this shell")
        if args.env:
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **{n: os.environ[n] for n in args.env}}
        return submit_fleet(args.config, address=args.address, runtime_env=runtime_env or None,
                            timeout=args.timeout, summary_json=args.summary_json, quiet=args.quiet,
                            break_lock=args.break_lock)
    except SafeMergeError as exc:  # never submitted, or the job was lost: no record from the job itself
        emit_record(error_record(started, args.config, exc, exc.exit_code).to_dict(), args.summary_json,
                    record_line=False)
        raise



def cmd_sweep(args: argparse.Namespace) -> int:
    from ..core import below_tau
    from ..fleet import AdapterStatus, load_config, score_fleet
    from ..progress import configure

    config = load_config(args.config)
    configure("text", stream=sys.stderr)  # stdout is the table (or the JSON)
    try:
        rhos, plan = score_fleet(config, progress=not args.quiet, ray_address=args.address)
    finally:
        configure("text")
    failed = {st.ref.name: st.reason for st in plan.by_status(AdapterStatus.FAILED)}
    rows: dict[str, dict] = {}
    for name, by_module in sorted(rhos.items()):
        settings, values = config.settings_for(name), sorted(by_module.values())
        rows[name] = {
            "modules": len(values),
            "repaired": {f"{t:g}": sum(below_tau(replace(settings, tau=t), r) for r in values) for t in args.tau},
            "rho": {"min": values[0], "p10": _quantile(values, 0.1), "p50": statistics.median(values),
                    "p90": _quantile(values, 0.9), "max": values[-1]},
        }
    total = {f"{t:g}": sum(r["repaired"][f"{t:g}"] for r in rows.values()) for t in args.tau}
    if args.format == "json":
        print(json.dumps({"adapters": rows, "total": {"modules": sum(r["modules"] for r in rows.values()),
                                                      "repaired": total}, "failed": failed}, indent=2))
        return ExitStatus.OK
    taus = [f"{t:g}" for t in args.tau]
    print("layers each tau would repair")
    print(f"{'adapter':<20} {'layers':>6} " + " ".join(f"{t:>5}" for t in taus))
    for name, r in rows.items():
        print(f"{name:<20} {r['modules']:>6} " + " ".join(f"{r['repaired'][t]:>5}" for t in taus))
    print(f"{'total':<20} {sum(r['modules'] for r in rows.values()):>6} " + " ".join(f"{total[t]:>5}" for t in taus))
    print(f"\nrho per adapter\n{'adapter':<20} {'min':>7} {'p10':>7} {'p50':>7} {'p90':>7} {'max':>7}")
    for name, r in rows.items():
        q = r["rho"]
        print(f"{name:<20} " + " ".join(f"{q[k]:>7.4f}" for k in ("min", "p10", "p50", "p90", "max")))
    for name, reason in failed.items():
        print(f"failed: {name}: {reason}")
    return ExitStatus.OK


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
