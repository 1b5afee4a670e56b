"""`segexp runs`, `ui`, `server`: the MLflow store and its servers."""

from __future__ import annotations

import os
from pathlib import Path

from .options import store_of


def runs(args) -> int:
    from segexp import tracking

    client, _, _ = store_of(args)
    experiments = client.search_experiments()
    ids = [e.experiment_id for e in experiments if not args.experiment or e.name in args.experiment]
    marked = tracking.cleanup_stale_runs(client, ids)
    print(f"marked KILLED: {len(marked)} run(s) whose process is gone")
    for run_id in marked:
        print(f"  {run_id}")
    return 0


def ui(args) -> int:
    from segexp.tracking import check_port, ui_command, ui_host_allowed

    if not ui_host_allowed(args.host, args.allow_remote):
        return 2
    if not args.print_command:
        check_port(args.host, args.port)
    client, artifacts, _ = store_of(args)
    command = ui_command(client.tracking_uri, artifacts, args.host, args.port) + args.extra
    print(" ".join(command))
    if not args.print_command:
        os.execv(command[0], command)
    return 0


def server(args) -> int:
    from segexp import config
    from segexp.tracking import serve

    work_dir = Path(args.work_dir or config.compose([]).work_dir).resolve()
    return serve(work_dir, args.port, args.postgres_port)


def store_commands(add) -> None:
    """runs, ui, server."""
    command = add("runs", runs, "housekeeping: mark KILLED the runs whose process is gone")
    command.add_argument("action", choices=["cleanup"])
    command.add_argument("--experiment", action="append", help="only these experiments")

    command = add("ui", ui, "MLflow UI on the store (localhost only unless --allow-remote)")
    command.add_argument("--host", default="127.0.0.1")
    command.add_argument("--port", type=int, default=5000)
    command.add_argument("--allow-remote", action="store_true", help="allow a non-local host")
    command.add_argument("--print-command", action="store_true", help="print, start nothing")
    command.add_argument("extra", nargs="*", help="passed to `mlflow server` after --")

    command = add(
        "server",
        server,
        "team tracking server: PostgreSQL and `mlflow server` on 127.0.0.1, data in the work dir",
        store=False,
    )
    command.add_argument("--work-dir", default=None, help="holds postgres/ and artifacts/")
    command.add_argument("--port", type=int, default=5000, help="the MLflow server's port")
    command.add_argument("--postgres-port", type=int, default=None, help="default: a free one")
