"""`opt-ray logbook`: print a run's logbook as a readable chronicle (and plot its loss curve)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from opt_ray.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logbook", help="print a run's logbook as a readable chronicle (and plot its loss curve)",
        description="print a run's logbook (RUN_DIR/logbook.jsonl) as a readable Markdown "
                    "chronicle: restarts, rollbacks, LR and clipping changes, skipped data, "
                    "with the loss at the time. See logbook/README.md for the event schema.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by `opt-ray train "
                   "--output`: a local directory or its URL (s3://bucket/run)")
    p.add_argument("--plot", metavar="PNG", help="also write the loss curve (from metrics.jsonl) to this PNG")
    p.add_argument("--json", action="store_true", help="print the raw events as JSON lines instead")
    p.add_argument("--follow", action="store_true",
                   help="after the chronicle so far, print new events as they arrive, until `finish`")
    p.add_argument("--poll", type=float, default=5.0, metavar="SECONDS",
                   help="with --follow of a URL: seconds between reads of the bucket (default 5)")
    p.add_argument("--output", "-o", metavar="MD", help="write the chronicle to this file instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from opt_ray import logbook as lb

    from opt_ray.run_dir import RunMirror, is_url

    if args.poll <= 0:
        raise UserError(f"--poll must be > 0 seconds, got {args.poll}")
    mirror = None
    if is_url(args.run_dir):
        mirror = RunMirror(args.run_dir)
        mirror.pull()
        if not (mirror.local / lb.LOGBOOK).is_file():
            raise UserError(f"{args.run_dir} has no {lb.LOGBOOK}; pass the --output URL of an "
                            f"`opt-ray train` run (and the AWS variables of its store)")
        name, args.run_dir = args.run_dir, str(mirror.local)
    else:
        name = None
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; pass the RUN_DIR that `opt-ray train --output` wrote")
    if not (run_dir / lb.LOGBOOK).exists() and not args.follow:
        raise UserError(f"{run_dir} has no {lb.LOGBOOK}; is it a run directory of `opt-ray train`?")

    already = list(lb.Logbook(run_dir).events())  # before rendering: --follow starts here
    plot_ref = None
    if args.plot:
        png = lb.plot_loss(run_dir, args.plot)
        # Embed the plot relative to where the Markdown goes, so the link works there.
        base = Path(args.output).resolve().parent if args.output else Path.cwd()
        plot_ref = os.path.relpath(png.resolve(), base)

    if args.json:
        text = "".join(json.dumps(e) + "\n" for e in lb.Logbook(run_dir).events())
    else:
        text = lb.render_markdown(run_dir, plot=plot_ref, name=name)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text, end="")
    if args.follow:
        if not any(e.get("event") == "finish" for e in already):
            try:
                # A bucket run: its staging copy here is pulled as rank 0 pushes (every
                # checkpoint and every --mirror-every seconds of the run).
                lb.follow(run_dir, skip=len(already), refresh=mirror.pull if mirror else None,
                          refresh_every=args.poll)
            except KeyboardInterrupt:
                pass  # the user stopped following; what was printed stands
    return 0
