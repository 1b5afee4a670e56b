"""The MLflow store: where it is, opening it once (schema, reachability), experiments, stale runs.

The embedded default is `sqlite:///<work_dir>/mlflow.db` with artifacts in `<work_dir>/artifacts`
(`work_dir` defaults to `./mlruns`, see conf/train.yaml); `tracking.uri` or `MLFLOW_TRACKING_URI`
points at a server.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from segexp.files import file_lock

from . import tags

# What these experiments are. MLflow 3.17's UI no longer picks its view by it: a browser-wide
# "GenAI | Model training" switch does (GenAI by default), which `experiment_url` sets.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A server that goes away mid-run is retried for about a minute (MLflow's default is minutes):
# urllib3 sleeps 0, 4, 8, 16, 32 s between the 6 tries (4 retries gave up after 28 s, less than
# an `mlflow server` takes to restart on a busy machine).
HTTP_RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class StoreError(RuntimeError):
    """The tracking store cannot be used; the message names its URI."""


def store_locations(tracking_cfg, work_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact root URI): explicit config, then MLFLOW_TRACKING_URI, then default.

    A server's artifact root is its own (None): a path in this client's work dir would send the
    artifacts of every experiment it creates there, out of the server's reach and the team's.
    """
    uri = tracking_cfg.get("uri") or os.environ.get("MLFLOW_TRACKING_URI")
    uri = uri or f"sqlite:///{(Path(work_dir) / 'mlflow.db').resolve()}"
    artifacts = tracking_cfg.get("artifact_location")
    if not artifacts and not uri.startswith(("http://", "https://")):
        artifacts = (Path(work_dir) / "artifacts").resolve().as_uri()
    return uri, artifacts


def work_dir_of(uri: str) -> Path | None:
    """The work dir whose embedded default store `uri` is, or None (a server, another file)."""
    if uri.startswith("sqlite:///") and uri.endswith("/mlflow.db"):
        return Path(uri.removeprefix("sqlite:///")).parent
    return None


def store_file(uri: str) -> str | None:
    """The resolved database file of a SQLite store (None for a server: one has no copies)."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri.removeprefix("sqlite:///")).resolve())
    return None


def open_store(tracking_cfg, work_dir: Path) -> tuple[MlflowClient, str | None]:
    """(client, artifact root) of the configured store, checked before any data work.

    A fresh SQLite store is created and migrated once, under a file lock: several processes
    opening it at once race in MLflow's schema setup. A server must answer its health check
    within seconds, so a wrong URI fails fast with one line instead of minutes of retries.
    """
    uri, artifact_root = store_locations(tracking_cfg, work_dir)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(Path(f"{db}.lock")):
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, artifact_root)  # creates or migrates the schema, then closes
    elif uri.startswith(("http://", "https://")):
        uri = credentials_to_env(uri)
        for key, value in HTTP_RETRY_ENV.items():
            os.environ.setdefault(key, value)
        # a sweep's job: the server just answered for its parent run, so an outage now is a
        # restart, not a wrong URI; wait as a request would, instead of losing the job
        check_server(uri, patience=SERVER_PATIENCE if tracking_cfg.get("parent_run_id") else 0)
    return MlflowClient(tracking_uri=uri), artifact_root


def credentials_to_env(uri: str) -> str:
    """`http://alice:pw@host` -> `http://host`, its user and password where MLflow reads them.

    MLflow's client takes HTTP basic-auth credentials from MLFLOW_TRACKING_USERNAME / _PASSWORD
    (urllib refuses them in the URI); variables the user set win.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    for name, value in (("USERNAME", parts.username), ("PASSWORD", parts.password)):
        if value:
            os.environ.setdefault(f"MLFLOW_TRACKING_{name}", urllib.parse.unquote(value))
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


SERVER_PATIENCE = 60.0  # seconds: about what HTTP_RETRY_ENV's retries add up to


def check_server(uri: str, timeout: float = 5.0, patience: float = 0.0) -> None:
    """Raise StoreError unless the tracking server at `uri` answers `/health`, within
    `patience` seconds of retrying when it is unreachable."""
    deadline = time.monotonic() + patience
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                response.read()
            return
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                return  # an authenticating server is up; MLflow's client brings the credentials
            raise StoreError(f"tracking server {uri} answered HTTP {err.code} to /health") from err
        except (OSError, ValueError) as err:
            if isinstance(err, ValueError) or time.monotonic() >= deadline:
                waited = f" for {patience:.0f} s" if patience else ""
                raise StoreError(f"tracking server {uri} is unreachable{waited} ({err})") from err
        time.sleep(2)


def experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """Get or create the experiment, with its artifacts under `artifact_root/<name>`.

    No `artifact_root` (a server's store): where the server puts them.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:  # created by a concurrent job in between
        return client.get_experiment_by_name(name).experiment_id


def experiment_url(server_url: str, experiment_id: str) -> str:
    """The UI page of an experiment, opened on the model-training view (its runs)."""
    return f"{server_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def cleanup_stale_runs(client: MlflowClient, experiment_ids: list[str]) -> list[str]:
    """Mark KILLED the RUNNING runs whose recorded process (pid on this host) is gone.

    A run killed by SIGKILL or the OOM killer cannot end itself; its `segexp.pid` and
    `segexp.host` tags tell whether anything is still writing to it. Runs of other hosts are
    left alone. Returns the ids marked.
    """
    host, marked = socket.gethostname(), []
    for run in client.search_runs(
        experiment_ids, "attributes.status = 'RUNNING'", max_results=5000
    ):
        pid = run.data.tags.get(tags.PID, "")
        if run.data.tags.get(tags.HOST) != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "stop_reason", f"process {pid} on {host} is gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(run.info.run_id)
    return marked
