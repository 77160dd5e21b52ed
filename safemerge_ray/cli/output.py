"""Commands on a fleet output: `verify`, `rollback`, `gc`, `status`, `report`, `runs`, `diff`, `export`."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from ..errors import ExitStatus, SafeMergeError
from ..io import open_dir

OUTPUT_HELP = "a fleet output (local dir or s3://; endpoint from AWS_ENDPOINT_URL)"


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        value = -1
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected an age like 7d, 12h, 30m or a number of seconds; got {text!r}")
    return value



def add_parsers(sub) -> None:
    v = sub.add_parser("verify", help="re-read published adapters and check them against their manifests")
    v.add_argument("output", help=OUTPUT_HELP)
    v.add_argument("--adapter", default=None, help="only this adapter (default: every latest/ pointer)")
    v.add_argument("--run", default=None, help="every object of this run instead of the published adapters")
    v.set_defaults(func=cmd_verify)

    st = sub.add_parser("status", help="every adapter's current run, layers repaired, lowest rho; stale or "
                                       "orphaned pointers")
    st.add_argument("output", help=OUTPUT_HELP)
    st.add_argument("--config", default=None,
                    help="the fleet config: also say which adapters the next run would redo (and why) and which "
                         "pointers are orphaned")
    st.add_argument("--format", choices=("table", "json", "parquet"), default="table",
                    help="table (default), json (one entry per adapter), or parquet (every current decision row)")
    st.add_argument("--out", metavar="FILE", default=None, help="write to FILE instead of stdout (parquet needs it)")
    st.set_defaults(func=cmd_status)

    rp = sub.add_parser("report", help="one self-contained report.html: rho heatmap, histogram, one row per adapter")
    rp.add_argument("output", help=OUTPUT_HELP)
    rp.add_argument("--run", default=None,
                    help="that run's adapters, written to runs/RUN/report.html (default: the fleet's current "
                         "state, written to OUTPUT/report.html)")
    rp.add_argument("--out", metavar="FILE", default=None, help="write the page to FILE instead")
    rp.set_defaults(func=cmd_report)

    r = sub.add_parser("runs", help="every run of an output: committed, nothing to do, or failed")
    r.add_argument("output", help=OUTPUT_HELP)
    r.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default), or json: every run record, held and failed adapters included")
    r.set_defaults(func=cmd_runs)

    d = sub.add_parser("diff", help="which adapters and layers changed decision or rho between two runs, and why")
    d.add_argument("output", help=OUTPUT_HELP)
    d.add_argument("runs", nargs="*", metavar="RUN", help="RUN_A RUN_B (default with --adapter: its last two runs)")
    d.add_argument("--adapter", default=None, help="only this adapter")
    d.set_defaults(func=cmd_diff)

    g = sub.add_parser("gc", help="remove runs no pointer needs beyond the newest K, and failed attempts' leftovers")
    g.add_argument("output", help=OUTPUT_HELP)
    g.add_argument("--keep", type=int, required=True, metavar="K",
                   help="keep the newest K committed runs besides every run a pointer names (rollback targets)")
    g.add_argument("--older-than", type=_duration, default=None, metavar="AGE",
                   help="only remove what is older than AGE (e.g. 7d, 12h, 30m, or seconds)")
    g.add_argument("--history-keep", type=int, default=400, metavar="N",
                   help="keep the newest N run records in status/history/ (default 400: over a year of nights)")
    g.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    g.add_argument("--break-lock", action="store_true", help="take the run lock even if a run holds it")
    g.set_defaults(func=cmd_gc)

    b = sub.add_parser("rollback", help="point an adapter back at its output from an earlier committed run")
    b.add_argument("output", help=OUTPUT_HELP)
    b.add_argument("adapter", help="the adapter's name")
    b.add_argument("--to", required=True, metavar="RUN", help="the run id (see OUTPUT/runs/ or status/history/)")
    b.add_argument("--break-lock", action="store_true", help="take the output's run lock even if held")
    b.set_defaults(func=cmd_rollback)

    _add_export_parser(sub)


def _add_export_parser(sub) -> None:
    e = sub.add_parser("export", help="copy the published adapters, verified, to a directory or s3:// prefix for "
                                      "serving: DEST/<adapter>@<run_id>/ per version, DEST/<adapter> -> the current "
                                      "one (local), DEST/index.json (docs/serving.md)")
    e.add_argument("output", help=OUTPUT_HELP)
    e.add_argument("--to", required=True, metavar="DEST", dest="dest",
                   help="a local directory (created if its parent exists; vLLM's VLLM_LORA_RESOLVER_CACHE_DIR or "
                        "--lora-modules read it) or s3://bucket/prefix (LoRAX adapter ids)")
    e.add_argument("--keep", type=int, default=None, metavar="N",
                   help="keep the newest N versions of each adapter exported, and always its current one "
                        "(default: keep every version)")
    e.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="export only these adapters (default: every adapter with a latest/ pointer)")
    e.set_defaults(func=cmd_export)


def cmd_verify(args: argparse.Namespace) -> int:
    """0: every object checked is there with the sha256 its manifest recorded; 1: something is not."""
    from ..store import verify_output

    out = open_dir(args.output, what="output")
    bad = 0
    for what, problems in verify_output(out, adapter=args.adapter, run=args.run):
        print(f"{'ok ' if not problems else 'BAD'}  {what}" + "".join(f"\n     {p}" for p in problems))
        bad += bool(problems)
    if bad:
        print(f"safemerge-ray: {bad} damaged; a fleet run redoes damaged adapters it can detect", file=sys.stderr)
    return ExitStatus.ENVIRONMENT if bad else ExitStatus.OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from ..store import rollback

    rollback(open_dir(args.output, what="output"), args.adapter, args.to, break_lock=args.break_lock)
    print(f"{args.adapter} now points at run {args.to} (verified); a fleet run redoes it if its inputs, settings "
          "or tool version differ from that run's")
    return ExitStatus.OK


def cmd_gc(args: argparse.Namespace) -> int:
    from ..store import collect_garbage

    out = open_dir(args.output, what="output")
    report = collect_garbage(out, args.keep, args.older_than, dry_run=args.dry_run, break_lock=args.break_lock,
                             history_keep=args.history_keep)
    verb = "would remove" if args.dry_run else "removed"
    for run in report.removed_runs:
        print(f"{verb} run {run}")
    if report.leftovers:
        print(f"{verb} {len(report.leftovers)} leftover object(s) of failed attempts and interrupted writes")
    if report.records:
        print(f"{verb} {len(report.records)} run record(s) beyond the newest {args.history_keep}")
    print(f"{verb} {report.objects} object(s); kept {len(report.kept_runs)} run(s) in {out.uri}")
    return ExitStatus.OK


def _output(location: str, config=None):
    from ..io import S3Settings

    return open_dir(location, what="output", s3=config.s3 if config is not None else S3Settings())


def _write_text(text: str, path: str | None) -> None:
    if path is None:
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def cmd_status(args: argparse.Namespace) -> int:
    from ..store import current_decisions_table, fleet_status, format_status, status_json

    config, plan = None, None
    if args.config:
        from ..fleet import load_config, plan_fleet

        config = load_config(args.config)
    out = _output(args.output, config)
    if config is not None:
        plan = plan_fleet(config, out).next_runs()
    statuses, rows = fleet_status(out, plan)
    if args.format == "parquet":
        if not args.out:
            raise SafeMergeError("status --format parquet needs --out FILE")
        import pyarrow.parquet as pq

        pq.write_table(current_decisions_table(rows), args.out)
        print(f"{len(rows)} decision rows of {len(statuses)} adapters written to {args.out}")
    else:
        _write_text(format_status(statuses) if args.format == "table" else status_json(statuses), args.out)
    return ExitStatus.OK


def cmd_report(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..fleet import AdapterStatus
    from ..io import read_json
    from ..store import (
        DECISIONS,
        REPORT,
        SUMMARY,
        Decisions,
        PublishedState,
        check_run_id,
        fleet_status,
        run_prefix,
        utc_now,
    )
    from ..views import render

    out = _output(args.output)
    if args.run:
        check_run_id(args.run, "report --run")
        run_rows = Decisions(out).all(args.run)
        if run_rows is None:
            raise SafeMergeError(f"report: run {args.run} has no readable {DECISIONS} in {out.uri}")
        summary = (read_json(out, f"{run_prefix(args.run)}{SUMMARY}") or {}).get("adapters") or {}  # every adapter
        held = {name: e.get("reason", "") for name, e in summary.items() if e.get("status") == AdapterStatus.HELD}
        rows = [dict(r, run_id=args.run) for r in run_rows if r["adapter"] not in held]
        title, target, states = f"safemerge-ray run {args.run}", f"{run_prefix(args.run)}{REPORT}", None
    else:
        statuses, rows = fleet_status(out)
        title, target = f"safemerge-ray fleet {out.uri}", REPORT
        states = {s.adapter: s.state for s in statuses}
        held = {s.adapter: s.detail for s in statuses if s.state == PublishedState.HELD}
    if not rows:
        raise SafeMergeError(f"report: no decisions to show in {out.uri}")
    made = f"Made {utc_now()} by safemerge-ray {__version__} from {out.uri}" + (
        f" (run {args.run})" if args.run else " (the fleet's current state: each adapter's published run)")
    page, table, _ = render(rows, title, states, held, made)
    if args.out:
        with open(args.out, "w") as f:
            f.write(page)
        where = args.out
    else:
        out.write(target, page.encode())
        where = f"{out.uri.rstrip('/')}/{target}"
    print(f"report of {len(table)} adapters, {len(rows)} layers: {where}")
    return ExitStatus.OK


def cmd_runs(args: argparse.Namespace) -> int:
    from ..store import format_runs, list_runs

    entries = list_runs(_output(args.output))
    print(format_runs(entries) if args.format == "table" else json.dumps([asdict(e) for e in entries], indent=2))
    return ExitStatus.OK


def cmd_diff(args: argparse.Namespace) -> int:
    from ..store import committed_runs_of, diff_runs, format_diff

    out = _output(args.output)
    if len(args.runs) == 2:
        before, after = args.runs
    elif not args.runs and args.adapter:
        runs = committed_runs_of(out, args.adapter)
        if not runs:
            raise SafeMergeError(f"diff: no committed run published {args.adapter} in {out.uri}")
        before, after = (runs[-2] if len(runs) > 1 else None), runs[-1]
    else:
        raise SafeMergeError("diff: give two runs (RUN_A RUN_B), or --adapter NAME for its last two runs")
    print(format_diff(diff_runs(out, before, after, [args.adapter] if args.adapter else None)))
    return ExitStatus.OK


def cmd_export(args: argparse.Namespace) -> int:
    """0: every adapter is in DEST; 3: some failed (the others are exported); 4: none is."""
    from ..service import ExportOutcome, export_published, open_target

    report = export_published(_output(args.output), open_target(args.dest), only=args.only, keep=args.keep)
    for a in report.adapters:
        if a.outcome == ExportOutcome.FAILED:
            print(f"safemerge-ray: error: export of {a.adapter}: {a.detail}", file=sys.stderr)
        else:
            print(f"{a.outcome:<14} {a.version}")
    for version in report.removed:
        print(f"{'removed':<14} {version}")
    exported, present = report.count(ExportOutcome.EXPORTED), report.count(ExportOutcome.PRESENT)
    failed = report.count(ExportOutcome.FAILED)
    print(f"{exported} exported, {present} already there, {failed} failed, {len(report.removed)} old version(s) "
          f"removed in {report.dest}")
    if not failed:
        return ExitStatus.OK
    return ExitStatus.PARTIAL if exported + present else ExitStatus.FAILED
