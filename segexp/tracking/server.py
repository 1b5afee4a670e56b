"""A tracking server for a team of one: PostgreSQL on loopback and `mlflow server` on top of it.

`segexp server` (and `make server`) keeps everything under the work dir: the database cluster in
`<work_dir>/postgres` (initdb'd on first use), its password in `<work_dir>/postgres.pgpass`
(mode 600; the backend URI names the file, never the secret) and the artifacts the server
proxies in `<work_dir>/artifacts`. Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
DB_USER, DB_NAME = "segexp", "mlflow"
# PostgreSQL refuses to run as root; root starts it as this (Debian's package creates it).
OS_USER = "postgres"


class ServerError(RuntimeError):
    """PostgreSQL or the MLflow server cannot be started; the message says why."""


def pg_program(name: str) -> str:
    """A PostgreSQL server program: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which(name)
    if found:
        return found
    debian = [p for p in Path("/usr/lib/postgresql").glob(f"*/bin/{name}") if p.parts[-3].isdigit()]
    if not debian:
        raise ServerError(
            f"PostgreSQL's {name} is not installed: `make postgres` installs Debian's "
            "postgresql package (as root)"
        )
    return str(max(debian, key=lambda p: int(p.parts[-3])))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Refuse a port this process could not listen on (another server holds it), by number.

    Checked before anything starts: on a taken port `mlflow server` retries for seconds, exits
    with the cause in its log, and another server's health check answers in its place.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServerError(
                f"port {port} on {host} is taken or refused ({err.strerror or err}): "
                "stop what listens there or pass another --port"
            ) from None


def as_owner(command: list[str]) -> list[str]:
    """`command` run as the cluster's owner: this user, or `postgres` when this is root."""
    return ["runuser", "-u", OS_USER, "--", *command] if os.geteuid() == 0 else command


def run_pg(command: list[str], timeout: float = 120) -> None:
    # cwd "/": the owner may not be allowed into this process's working directory
    done = subprocess.run(
        as_owner(command), cwd="/", capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise ServerError(f"{Path(command[0]).name} failed: {(done.stderr or done.stdout)[-2000:]}")


def give_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(OS_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def init_postgres(data_dir: Path, passfile: Path) -> None:
    """A new cluster in `data_dir`: password login for DB_USER over TCP on loopback only."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            raise ServerError(
                f"PostgreSQL refuses to run as root and there is no `{OS_USER}` user: "
                "`make postgres` installs Debian's postgresql package, which creates it"
            ) from None
    data_dir.mkdir(parents=True, mode=0o700)
    give_to_owner(data_dir)
    reachable = subprocess.run(as_owner(["test", "-w", str(data_dir)]), cwd="/", check=False)
    if reachable.returncode != 0:
        data_dir.rmdir()
        raise ServerError(
            f"user {OS_USER} cannot reach {data_dir} (PostgreSQL refuses to run as root): "
            "use a work dir whose parent folders others may enter (chmod o+x)"
        )
    password = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory() as tmp:
        pwfile = Path(tmp) / "pw"
        pwfile.write_text(password + "\n")
        for path in (Path(tmp), pwfile):
            give_to_owner(path)
        run_pg(
            [
                pg_program("initdb"),
                "-D",
                str(data_dir),
                "-U",
                DB_USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )
    with open(data_dir / "postgresql.conf", "a") as conf:
        # TCP on loopback only; no Unix socket (its path length limit and directory rights)
        conf.write(f"\nlisten_addresses = '{HOST}'\nunix_socket_directories = ''\n")
    fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{HOST}:*:*:{DB_USER}:{password}\n")


def start_postgres(data_dir: Path, port: int) -> str:
    """Start (initdb'ing on first use) the cluster in `data_dir` on HOST:port; its backend URI."""
    data_dir = Path(data_dir).resolve()
    passfile = data_dir.with_name(f"{data_dir.name}.pgpass")
    if not (data_dir / "PG_VERSION").is_file():
        init_postgres(data_dir, passfile)
    if (data_dir / "postmaster.pid").is_file():
        raise ServerError(
            f"a PostgreSQL already runs on {data_dir} (or died and left postmaster.pid): stop "
            f"the `segexp server` that started it, or `pg_ctl -D {data_dir} stop`"
        )
    log = data_dir / "server.log"
    run_pg(
        [pg_program("pg_ctl"), "-D", str(data_dir), "-l", str(log), "-o", f"-p {port}", "-w"]
        + ["-t", "60", "start"]
    )
    import psycopg2  # the driver MLflow's PostgreSQL store uses too

    connection = psycopg2.connect(
        host=HOST, port=port, user=DB_USER, dbname="postgres", passfile=str(passfile)
    )
    try:
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
            if cursor.fetchone() is None:
                cursor.execute(f"CREATE DATABASE {DB_NAME}")
    finally:
        connection.close()
    return f"postgresql+psycopg2://{DB_USER}@{HOST}:{port}/{DB_NAME}?passfile={passfile}"


def stop_postgres(data_dir: Path) -> None:
    """Stop the cluster in `data_dir` (fast: open connections are closed)."""
    if (Path(data_dir) / "postmaster.pid").is_file():
        run_pg(
            [pg_program("pg_ctl"), "-D", str(Path(data_dir).resolve()), "-m", "fast", "-w"]
            + ["-t", "60", "stop"]
        )


def mlflow_command(
    backend_uri: str,
    artifacts: tuple[str, str],
    host: str,
    port: int,
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """`mlflow server` on `backend_uri`; `artifacts` is (`--default-artifact-root` or
    `--artifacts-destination`, URI)."""
    # one worker per 2 cores: MLflow's default 4 make a small machine slow to answer
    workers = max(1, (os.cpu_count() or 1) // 2)
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_uri,
        *artifacts,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra,
    ]


REMOTE_ADVICE = """segexp ui: {host} exposes the MLflow server, which has no authentication by default, to
every machine that can reach this one. If that is what you want:
  - keep MLflow's security middleware on and name who may connect:
      --allowed-hosts 'my-host.example.org:*' --cors-allowed-origins 'https://my-host.example.org'
  - turn on authentication: `mlflow server --app-name basic-auth` (set MLFLOW_FLASK_SERVER_SECRET_KEY)
  - or keep it on 127.0.0.1 and reach it through an SSH tunnel: ssh -L 5000:127.0.0.1:5000 HOST
Pass --allow-remote to bind {host} anyway."""


def ui_host_allowed(host: str, allow_remote: bool) -> bool:
    """A loopback host, or another one with its risks printed and `--allow-remote` given."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return True
    print(REMOTE_ADVICE.format(host=host), file=sys.stderr)
    return allow_remote


def ui_command(tracking_uri: str, artifacts: str | None, host: str, port: int) -> list[str]:
    """`mlflow server` for `segexp ui` on a store of the work dir (not a server)."""
    if artifacts is None:
        raise ValueError(f"{tracking_uri} is a server already: open it in a browser")
    return mlflow_command(tracking_uri, ("--default-artifact-root", artifacts), host, port)


def start_mlflow(
    backend_uri: str, artifacts_dir: Path, port: int, log: Path, timeout: float = 180
) -> subprocess.Popen:
    """`mlflow server` on HOST:port proxying artifacts to `artifacts_dir`, once it answers."""
    command = mlflow_command(
        backend_uri, ("--artifacts-destination", Path(artifacts_dir).resolve().as_uri()), HOST, port
    )
    with open(log, "a") as out:  # its own session: stop() ends the workers it starts too
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log).read_text()[-2000:]
            raise ServerError(f"mlflow server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise ServerError(f"mlflow server did not answer on {url} within {timeout:.0f} s (log: {log})")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server's process group, SIGKILL it after `timeout` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # workers left behind by a server that died first
        os.killpg(proc.pid, signal.SIGKILL)


def serve(work_dir: Path, port: int, postgres_port: int | None = None) -> int:
    """`segexp server`: both servers until Ctrl-C or SIGTERM, which stop both."""
    from .store import experiment_url

    check_port(HOST, port)
    if postgres_port:
        check_port(HOST, postgres_port)
    work_dir.mkdir(parents=True, exist_ok=True)
    backend = start_postgres(work_dir / "postgres", postgres_port or free_port())
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    proc = None
    try:
        proc = start_mlflow(backend, work_dir / "artifacts", port, work_dir / "mlflow-server.log")
        url = f"http://{HOST}:{port}"
        print(
            f"tracking.uri={url}\n"
            f"  UI: {url}; an experiment's runs: {experiment_url(url, 'ID')}\n"
            f"  PostgreSQL in {work_dir / 'postgres'}, artifacts in {work_dir / 'artifacts'}, "
            f"log {work_dir / 'mlflow-server.log'}; Ctrl-C stops both",
            flush=True,
        )
        proc.wait()
        log = work_dir / "mlflow-server.log"
        print(
            f"segexp server: mlflow server exited with {proc.returncode}: see {log}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if proc is not None:
            stop(proc)
        stop_postgres(work_dir / "postgres")
