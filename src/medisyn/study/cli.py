"""``medisyn study <command>``: create a study, add readers, serve it, close it, report it (docs/study.md).

A study spans days of clinicians' time, not one pipeline step, so these commands act on the study
database (``study.db_url``, ``$MEDISYN_STUDY_DB_URL`` or ``--db``) rather than through the stage
runner; the verdict that matters for approval, the human gate, is a runner stage
(``medisyn human-gate``). Secrets (the admin token, each reader's token) are printed once, on stdout,
and never stored in clear.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from medisyn.config import RunConfig

EXIT_BAD_INPUT = 2


def add_parser(sub: Any, add_config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``study`` and its commands to the top-level subparsers ``sub``."""
    sp = sub.add_parser("study", help="clinician reader study: create, add-reader, serve, close, report "
                        "(docs/study.md)", description=(__doc__ or "").splitlines()[0])
    sp.set_defaults(inputs=None)
    cmds = sp.add_subparsers(dest="study_command", required=True, metavar="<command>")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = cmds.add_parser(name, help=help, description=help)
        add_config_args(c)
        c.add_argument("--db", default=None,
                       help="study database URL (default: study.db_url, else $MEDISYN_STUDY_DB_URL, else "
                       "sqlite:///medisyn-study.db)")
        return c

    c = cmd("create", "build a blinded study from a model version and real test-split images; prints the "
            "admin token once")
    c.add_argument("--model", required=True, help="models:/<name>/<version>, models:/<name>@<alias> or a version")
    c.add_argument("--dataset", required=True,
                   help="dataset URI (output of preprocess): the real images come from its test split")
    c.add_argument("--task", default=None, help="name of a task in study.tasks (default: study.task)")
    c.add_argument("--name", default="", help="a name for the study (default: task, model and version)")
    c = cmd("add-reader", "register a reader; prints their personal link once")
    c.add_argument("--study", required=True, help="study id (printed by create)")
    c.add_argument("--name", required=True, help="how the report names the reader, e.g. 'Attending #1'")
    c.add_argument("--base-url", default="http://127.0.0.1:8080", help="where the app is reached, for the link")
    c = cmd("rotate-admin", "issue a new admin token for a study (the old one stops working)")
    c.add_argument("--study", required=True, help="study id")
    c = cmd("serve", "serve the reader and admin pages until stopped")
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    c.add_argument("--port", type=int, default=8080, help="TCP port")
    c = cmd("close", "close a study: no more answers; the report and the human gate may read it")
    c.add_argument("--study", required=True, help="study id")
    c = cmd("report", "accuracy, confidence, confusion matrices and Fleiss' kappa of a closed study; logged to "
            "MLflow on the model version")
    c.add_argument("--study", required=True, help="study id")
    c.add_argument("--out", required=True, help="output prefix (file:// or s3://): result.json, figures, tables")
    c.add_argument("--no-mlflow", action="store_true", help="write the files only; log nothing to MLflow")


def run(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Run one ``medisyn study`` command; returns the exit status."""
    from medisyn import storage
    from medisyn.study import db

    storage.configure(cfg.storage.s3_endpoint_url)
    url = args.db or cfg.study.db_url
    command = args.study_command
    try:
        if command == "create":
            from medisyn.study.create import create_study

            created, admin = create_study(cfg, args.model, args.dataset, task=args.task, name=args.name, db_url=url)
            print(json.dumps(created.to_dict(), indent=2, sort_keys=True))
            print(f"admin token (shown once; progress page /admin/<token>): {admin}")
        elif command == "add-reader":
            token = db.add_reader(db.open_db(url), args.study, args.name)
            print(f"reader {args.name!r}: {args.base_url.rstrip('/')}/read/{token}  (shown once; send it privately)")
        elif command == "rotate-admin":
            print(f"admin token (shown once): {db.rotate_admin_token(db.open_db(url), args.study)}")
        elif command == "serve":
            from medisyn.study.app import serve

            serve(url, host=args.host, port=args.port)
        elif command == "close":
            closed = db.close_study(db.open_db(url), args.study)
            print(json.dumps({"study_id": args.study, "closed_at": closed.isoformat()}))
        elif command == "report":
            from medisyn.study.report import study_report

            report = study_report(cfg, args.study, args.out, db_url=url, log_mlflow=not args.no_mlflow)
            print(json.dumps(report.to_dict(), indent=2, sort_keys=True, default=str))
        else:  # argparse allows only the commands above
            raise AssertionError(command)
    except db.StudyError as exc:
        print(f"medisyn study {command}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
