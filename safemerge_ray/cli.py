"""`safemerge-ray` command line. User mistakes print one clear line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import sys

from .errors import SafeMergeError

# Exit status: 0 done; 1 environment error (credentials, a node that cannot see a path, disk, permissions);
# 2 bad input or config, nothing done; 3 (fleet) some adapters failed, the rest are committed or unchanged;
# 4 (fleet) no adapter is usable; 130 interrupted.
EXIT_OK, EXIT_USAGE = 0, 2
OUTPUT_HELP = "a fleet output (local dir or s3://; endpoint from AWS_ENDPOINT_URL)"


def _weights(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers like 0.8,0.2; got {text!r}") from None


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        value = -1
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected an age like 7d, 12h, 30m or a number of seconds; got {text!r}")
    return value


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safemerge-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="repair one fine-tuned LoRA adapter with SafeMERGE")
    m.add_argument("--unaligned", required=True, help="pre-alignment base model (dir, s3://, or hub id)")
    m.add_argument("--aligned", required=True, help="aligned chat model the adapters were trained on")
    m.add_argument("--safety-adapter", help="task-agnostic safety LoRA (required for policy safemerge)")
    m.add_argument("--finetuned", required=True, help="the fine-tuned LoRA adapter to repair")
    m.add_argument("--out", required=True, help="output directory (replaced atomically)")
    m.add_argument("--tau", type=float, default=0.35, help="similarity threshold (default 0.35)")
    m.add_argument("--weights", type=_weights, default=(0.8, 0.2),
                   help="fine-tune,safety weights for merged layers (default 0.8,0.2)")
    m.add_argument("--method", default="linear",
                   help="linear | cat | ties | dare_linear | dare_ties | magnitude_prune | svd | ties_svd | "
                        "dare_linear_svd | dare_ties_svd | magnitude_prune_svd (default linear; README: methods)")
    m.add_argument("--svd-rank", type=int, default=None, metavar="R",
                   help="rank of a *_svd method's merged layers (default: the larger of the two LoRA ranks)")
    m.add_argument("--policy", default="safemerge", help="safemerge (merge) | safelora (project) (default safemerge)")
    m.add_argument("--density", type=float, default=None, help="kept fraction for ties/dare/magnitude_prune")
    m.add_argument("--majority-sign-method", default="total", help="total | frequency (ties, dare_ties)")
    m.add_argument("--seed", type=int, default=0, help="seed for DARE's random drop (default 0)")
    chosen = m.add_mutually_exclusive_group()
    chosen.add_argument("--top-k", type=int, default=None, metavar="K",
                        help="repair the K layers with the lowest rho instead of those below tau")
    chosen.add_argument("--fraction", type=float, default=None, metavar="F",
                        help="repair the ceil(F x layers) layers with the lowest rho instead of those below tau")
    m.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    m.add_argument("--quiet", action="store_true", help="no progress lines")

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
    f.add_argument("--break-lock", action="store_true",
                   help="take the output's run lock even if another run's lease is still valid (operators only)")
    f.add_argument("--record-line", action="store_true", help=argparse.SUPPRESS)  # for `submit`: see RECORD_LINE

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

    v = sub.add_parser("verify", help="re-read published adapters and check them against their manifests")
    v.add_argument("output", help=OUTPUT_HELP)
    v.add_argument("--adapter", default=None, help="only this adapter (default: every latest/ pointer)")
    v.add_argument("--run", default=None, help="every object of this run instead of the published adapters")

    w = sub.add_parser("sweep", help="score the fleet once and print how many layers each tau would repair "
                                     "(and rho's quantiles); writes nothing")
    w.add_argument("config", help="fleet config YAML")
    w.add_argument("--tau", type=_taus, default=_taus("0.1:0.9:0.05"), metavar="START:STOP:STEP",
                   help="the taus to try, START to STOP inclusive (default 0.1:0.9:0.05), or a list like 0.2,0.35,0.5")
    w.add_argument("--address", default=None, help="Ray cluster to join (as for fleet)")
    w.add_argument("--format", choices=("table", "json"), default="table")
    w.add_argument("--quiet", action="store_true", help="no progress lines, and none of Ray's own log lines")

    st = sub.add_parser("status", help="every adapter's current run, layers repaired, lowest rho; stale or "
                                       "orphaned pointers")
    st.add_argument("output", help=OUTPUT_HELP)
    st.add_argument("--config", default=None,
                    help="the fleet config: also say which adapters the next run would redo (and why) and which "
                         "pointers are orphaned")
    st.add_argument("--format", choices=("table", "json", "parquet"), default="table",
                    help="table (default), json (one entry per adapter), or parquet (every current decision row)")
    st.add_argument("--out", metavar="FILE", default=None, help="write to FILE instead of stdout (parquet needs it)")

    rp = sub.add_parser("report", help="one self-contained report.html: rho heatmap, histogram, one row per adapter")
    rp.add_argument("output", help=OUTPUT_HELP)
    rp.add_argument("--run", default=None,
                    help="that run's adapters, written to runs/RUN/report.html (default: the fleet's current "
                         "state, written to OUTPUT/report.html)")
    rp.add_argument("--out", metavar="FILE", default=None, help="write the page to FILE instead")

    r = sub.add_parser("runs", help="every run of an output: committed, nothing to do, or failed")
    r.add_argument("output", help=OUTPUT_HELP)
    r.add_argument("--format", choices=("table", "json"), default="table")

    d = sub.add_parser("diff", help="which adapters and layers changed decision or rho between two runs, and why")
    d.add_argument("output", help=OUTPUT_HELP)
    d.add_argument("runs", nargs="*", metavar="RUN", help="RUN_A RUN_B (default with --adapter: its last two runs)")
    d.add_argument("--adapter", default=None, help="only this adapter")

    g = sub.add_parser("gc", help="remove runs no pointer needs beyond the newest K, and failed attempts' leftovers")
    g.add_argument("output", help=OUTPUT_HELP)
    g.add_argument("--keep", type=int, required=True, metavar="K",
                   help="keep the newest K committed runs besides every run a pointer names (rollback targets)")
    g.add_argument("--older-than", type=_duration, default=None, metavar="AGE",
                   help="only remove what is older than AGE (e.g. 7d, 12h, 30m, or seconds)")
    g.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    g.add_argument("--break-lock", action="store_true", help="take the run lock even if a run holds it")

    b = sub.add_parser("rollback", help="point an adapter back at its output from an earlier committed run")
    b.add_argument("output", help=OUTPUT_HELP)
    b.add_argument("adapter", help="the adapter's name")
    b.add_argument("--to", required=True, metavar="RUN", help="the run id (see OUTPUT/runs/ or status/history/)")
    b.add_argument("--break-lock", action="store_true", help="take the output's run lock even if held")

    from .evaluate import EvalSettings
    from .options import add_flags
    from .train import TrainSettings

    t = sub.add_parser("train-safety", help="train the task-agnostic safety LoRA on Ray (Ray Train + TRL SFT + PEFT)")
    add_flags(t, TrainSettings)
    t.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a new local Ray)")
    t.add_argument("--quiet", action="store_true", help="none of Ray's or the trainer's own log lines")

    e = sub.add_parser("eval", help="harmful rate and task score of the aligned model, each fine-tune and its "
                                    "repaired adapter (Ray Data generation, a refusal judge or a classifier)")
    add_flags(e, EvalSettings)
    e.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS or a new local Ray)")
    e.add_argument("--quiet", action="store_true", help="none of Ray's own log lines")

    s = sub.add_parser("synth", help="build a small synthetic model pair and adapters (demo and tests)")
    s.add_argument("--out", required=True, help="directory to create")
    s.add_argument("--arch", default="llama", choices=["llama", "qwen2"], help="model family (default llama)")
    s.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    s.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2 x hidden)")
    s.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    s.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter (default 8)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the models' weight dtype (default float32)")
    s.add_argument("--finetunes", type=int, default=1, help="number of fine-tuned adapters")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--write-config", action="store_true", help="also write OUT/fleet.yaml for `fleet`")
    s.add_argument("--output", default="merged",
                   help="the fleet output written into that config (default: merged, beside the config)")
    s.add_argument("--loop", action="store_true",
                   help="also write the loop's data (OUT/data/: safety.jsonl, harmful.txt, task.jsonl) and configs "
                        "(OUT/train.yaml, OUT/fleet.yaml with a gate, OUT/eval.yaml): make demo-loop")
    return parser


def cmd_merge(args) -> int:
    from .merge import MergeSettings
    from .repair import merge_to_dir
    from .report import format_table

    settings = MergeSettings(
        policy=args.policy, tau=args.tau, weights=tuple(args.weights), method=args.method,
        density=args.density, majority_sign_method=args.majority_sign_method, seed=args.seed,
        svd_rank=args.svd_rank,
        select="top_k" if args.top_k is not None else "fraction" if args.fraction is not None else "threshold",
        select_value=args.top_k if args.top_k is not None else args.fraction,
    )
    summary = merge_to_dir(
        unaligned=args.unaligned, aligned=args.aligned, safety_adapter=args.safety_adapter,
        finetuned=args.finetuned, out=args.out, settings=settings, device=args.device,
        progress=not args.quiet,
    )
    c = summary["counts"]
    print(format_table(summary["decisions"]))
    print(f"\n{c['repaired']} of {c['modules']} modules repaired ({settings.policy}, {settings.method}, "
          f"tau={settings.tau}); actions: {c['actions']}")
    print(f"merged adapter: {args.out}")
    return EXIT_OK


def cmd_fleet(args) -> int:
    from .config import load_config
    from .fleet import format_report, run_fleet
    from .output import RunRecord, utc_now
    from .progress import configure

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
        report = run_fleet(config, progress=not args.quiet, ray_address=args.address, runtime_env=runtime_env,
                           break_lock=args.break_lock)
    except SafeMergeError as exc:
        failed(exc, exc.exit_code)
        raise
    except KeyboardInterrupt as exc:
        failed(exc, 130)
        raise
    if args.log_format == "json":
        _log_outcomes(report)
    else:
        print(format_report(report))
    assert report.record is not None
    emit_record(report.record.to_dict(), args.summary_json, args.record_line)
    return report.exit_code


def _dry_run(config) -> int:
    from .fleet import plan_fleet
    from .storage import open_dir

    plan = plan_fleet(config, open_dir(config.output, what="output", s3=config.s3, must_exist=False))
    print(f"{'adapter':<20} {'would be':<10} why")
    for st in plan.states:
        status = {"pending": "redone", "unchanged": "unchanged", "failed": "failed"}[st.status]
        detail = "; ".join(st.why) if st.status == "pending" else (
            st.reason if st.status == "failed" else f"run {st.previous_run}")
        print(f"{st.ref.name:<20} {status:<10} {detail}")
    for w in plan.warnings:
        print(f"warning: {w}")
    print(f"dry run: {len(plan.pending)} to redo, {sum(st.status == 'unchanged' for st in plan.states)} unchanged, "
          f"{sum(st.status == 'failed' for st in plan.states)} invalid; nothing was started or written")
    return EXIT_OK


def _log_outcomes(report) -> None:
    """One JSON line per adapter (status, layers repaired, why it was redone or why it failed), then the run's."""
    from .progress import log

    shown, left_out = report.listed()  # bounded as the table is: all of them are in the run's summary
    for st in shown:
        fields = {"adapter": st.ref.name, "status": st.status}
        if st.counts:
            fields.update(repaired=st.counts["repaired"], modules=st.counts["modules"])
        if st.why and st.status == "committed":
            fields["why"] = st.why
        if st.status == "failed":
            fields["reason"] = st.reason
        if st.status == "unchanged":
            fields["published_run"] = st.previous_run
        log("adapter", f"{st.ref.name}: {st.status}", **fields)
    log("run", f"exit status {report.exit_code}", exit_status=report.exit_code, warnings=report.warnings[:100],
        output=report.output, counts=report.record.counts if report.record else None,
        failed_not_listed=left_out)


def json_arg(text: str | None, flag: str) -> dict | None:
    import json

    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SafeMergeError(f"{flag}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SafeMergeError(f"{flag}: expected a JSON object, like '{{\"env_vars\": {{...}}}}'")
    return value


# `submit` finds the run record in the job's log by this prefix (the job's exit status is flattened by Ray).
RECORD_LINE = "safemerge-ray run record: "


def error_record(started: str, config: str, exc: BaseException, status: int):
    """The run record of a run that stopped before its output was known (or was never submitted)."""
    from .output import RunRecord, utc_now

    return RunRecord(started_at=started, output="", config=config, ended_at=utc_now(), exit_status=status,
                     error=str(exc) or "interrupted")


def emit_record(record: dict, summary_json: str | None, record_line: bool) -> None:
    import json

    if summary_json:
        from pathlib import Path

        from .output import json_bytes
        from .storage import LocalDir

        path = Path(summary_json).absolute()
        LocalDir(path.parent).write(path.name, json_bytes(record))
    if record_line:
        print(RECORD_LINE + json.dumps(record, sort_keys=True), flush=True)


def cmd_submit(args) -> int:
    import os

    from .output import utc_now
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


def cmd_verify(args) -> int:
    """0: every object checked is there with the sha256 its manifest recorded; 1: something is not."""
    from .output import verify_output
    from .storage import open_dir

    out = open_dir(args.output, what="output")
    bad = 0
    for what, problems in verify_output(out, adapter=args.adapter, run=args.run):
        print(f"{'ok ' if not problems else 'BAD'}  {what}" + "".join(f"\n     {p}" for p in problems))
        bad += bool(problems)
    if bad:
        print(f"safemerge-ray: {bad} damaged; a fleet run redoes damaged adapters it can detect", file=sys.stderr)
    return 1 if bad else EXIT_OK


def cmd_rollback(args) -> int:
    from .output import rollback
    from .storage import open_dir

    rollback(open_dir(args.output, what="output"), args.adapter, args.to, break_lock=args.break_lock)
    print(f"{args.adapter} now points at run {args.to} (verified); a fleet run redoes it if its inputs, settings "
          "or tool version differ from that run's")
    return EXIT_OK


def cmd_gc(args) -> int:
    from .output import collect_garbage
    from .storage import open_dir

    out = open_dir(args.output, what="output")
    report = collect_garbage(out, args.keep, args.older_than, dry_run=args.dry_run, break_lock=args.break_lock)
    verb = "would remove" if args.dry_run else "removed"
    for run in report.removed_runs:
        print(f"{verb} run {run}")
    if report.leftovers:
        print(f"{verb} {len(report.leftovers)} leftover object(s) of failed attempts and interrupted writes")
    print(f"{verb} {report.objects} object(s); kept {len(report.kept_runs)} run(s) in {out.uri}")
    return EXIT_OK


def _output(location: str, config=None):
    from .storage import S3Settings, open_dir

    return open_dir(location, what="output", s3=config.s3 if config is not None else S3Settings())


def _write_text(text: str, path: str | None) -> None:
    if path is None:
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def cmd_status(args) -> int:
    from .config import load_config
    from .history import decisions_table, fleet_status, format_status, status_json

    config = load_config(args.config) if args.config else None
    statuses, rows = fleet_status(_output(args.output, config), config)
    if args.format == "parquet":
        if not args.out:
            raise SafeMergeError("status --format parquet needs --out FILE")
        import pyarrow.parquet as pq

        pq.write_table(decisions_table(rows), args.out)
        print(f"{len(rows)} decision rows of {len(statuses)} adapters written to {args.out}")
    else:
        _write_text(format_status(statuses) if args.format == "table" else status_json(statuses), args.out)
    return EXIT_OK


def cmd_report(args) -> int:
    from .history import Decisions, fleet_status
    from .output import DECISIONS, REPORT, manifest_key, read_json, run_prefix
    from .report_page import render

    out = _output(args.output)
    if args.run:
        run_rows = Decisions(out).all(args.run)
        if run_rows is None:
            raise SafeMergeError(f"report: run {args.run} has no readable {DECISIONS} in {out.uri}")
        held = (read_json(out, manifest_key(args.run)) or {}).get("held") or {}
        rows = [dict(r, run_id=args.run) for r in run_rows if r["adapter"] not in held]
        title, target, states = f"safemerge-ray run {args.run}", f"{run_prefix(args.run)}{REPORT}", None
    else:
        statuses, rows = fleet_status(out)
        title, target = f"safemerge-ray fleet {out.uri}", REPORT
        states = {s.adapter: s.state for s in statuses}
        held = {s.adapter: s.detail for s in statuses if s.state == "held"}
    if not rows:
        raise SafeMergeError(f"report: no decisions to show in {out.uri}")
    page, table, _ = render(rows, title, states, held)
    if args.out:
        with open(args.out, "w") as f:
            f.write(page)
        where = args.out
    else:
        out.write(target, page.encode())
        where = f"{out.uri.rstrip('/')}/{target}"
    print(f"report of {len(table)} adapters, {len(rows)} layers: {where}")
    return EXIT_OK


def cmd_runs(args) -> int:
    import json
    from dataclasses import asdict

    from .history import format_runs, list_runs

    entries = list_runs(_output(args.output))
    print(format_runs(entries) if args.format == "table" else json.dumps([asdict(e) for e in entries], indent=2))
    return EXIT_OK


def cmd_diff(args) -> int:
    from .history import committed_runs_of, diff_runs, format_diff

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
    return EXIT_OK


def cmd_sweep(args) -> int:
    import json
    import statistics
    from dataclasses import replace

    from .config import load_config
    from .fleet import score_fleet
    from .policy import below_tau
    from .progress import configure

    config = load_config(args.config)
    configure("text", stream=sys.stderr)  # stdout is the table (or the JSON)
    try:
        rhos, plan = score_fleet(config, progress=not args.quiet, ray_address=args.address)
    finally:
        configure("text")
    failed = {st.ref.name: st.reason for st in plan.states if st.status == "failed"}
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
        return EXIT_OK
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
    return EXIT_OK


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def cmd_train_safety(args) -> int:
    from .options import load_settings
    from .train import TrainSettings, train_safety

    result = train_safety(load_settings(TrainSettings, args), progress=not args.quiet, ray_address=args.address)
    losses = result.manifest["losses"]
    print(f"loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f} over {result.manifest['steps']} steps")
    print(f"safety adapter: {result.adapter}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from .evaluate import EvalSettings, format_summary, run_eval
    from .options import load_settings

    settings = load_settings(EvalSettings, args)
    result = run_eval(settings, progress=not args.quiet, ray_address=args.address)
    print(format_summary(result.summary))
    print(f"eval: {settings.output} ({result.table.num_rows} answers)")
    return EXIT_OK


def cmd_synth(args) -> int:
    from .synthetic import SynthSpec, build_fixture

    spec = SynthSpec(arch=args.arch, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                     rank=args.rank, dtype=args.dtype, seed=args.seed)
    paths = build_fixture(args.out, spec, n_finetunes=args.finetunes)
    for role, path in paths.items():
        print(f"{role}: {path}")
    if args.write_config:
        from .synthetic import write_fleet_config

        print(f"fleet config: {write_fleet_config(args.out, output=args.output)}")
    if args.loop:
        from .synthetic import write_loop_configs, write_loop_data

        for role, path in {**write_loop_data(args.out), **write_loop_configs(args.out, output=args.output)}.items():
            print(f"{role}: {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"merge": cmd_merge, "fleet": cmd_fleet, "submit": cmd_submit, "verify": cmd_verify,
                    "rollback": cmd_rollback, "gc": cmd_gc, "status": cmd_status, "report": cmd_report,
                    "runs": cmd_runs, "diff": cmd_diff, "sweep": cmd_sweep, "synth": cmd_synth,
                    "train-safety": cmd_train_safety, "eval": cmd_eval}
        return commands[args.command](args)
    except SafeMergeError as exc:  # inputs (2) or environment (1): one line, no traceback
        print(f"safemerge-ray: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # disk full, permissions: the environment, not a bug
        print(f"safemerge-ray: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        what = "nothing was committed" if args.command == "merge" else "pointers move only with a completed commit"
        print(f"safemerge-ray: interrupted; {what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
