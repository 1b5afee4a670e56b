"""How a process stops: signals raised only where it is safe; sweep jobs that outlive the sweep."""

from __future__ import annotations

import os
import signal
import threading
import time

from . import store

LAUNCHER_PID_ENV = "SEGEXP_LAUNCHER_PID"  # the sweep's process: its jobs end when it is gone
# The first SIGTERM/SIGINT this process received: once set, no further job of a sweep starts.
received_signal: list[int] = []
# Code that holds a store transaction. An exception that a signal handler raises in there can
# leave the transaction open, and with it SQLite's lock: no process can write any more, not
# even to mark this run KILLED. A signal that lands in there is raised again once it returned.
STORE_MODULES = ("sqlalchemy", "sqlite3", "mlflow.store", "psycopg2", "pymysql")
SIGNAL_RETRY_SECONDS = 0.05
run_open = threading.Event()  # a TrackedRun of this process is between enter and exit


class Interrupted(KeyboardInterrupt):
    """Raised by segexp's SIGTERM and Ctrl-C handlers so Lightning shuts down as on Ctrl-C."""


def inside_store_call(frame) -> bool:
    """Whether `frame` (where a signal interrupted the main thread) runs in STORE_MODULES."""
    while frame is not None:
        if str(frame.f_globals.get("__name__")).startswith(STORE_MODULES):
            return True
        frame = frame.f_back
    return False


def interrupt(signum: int, frame) -> None:
    """Raise Interrupted for `signum`, unless `frame` is in a store call: then re-send it."""
    if inside_store_call(frame):
        main = threading.main_thread().ident
        retry = threading.Timer(SIGNAL_RETRY_SECONDS, signal.pthread_kill, (main, signum))
        retry.daemon = True
        retry.start()
        return
    raise Interrupted(f"received signal {signum}")


watched_launchers: set[int] = set()


def watch_launcher(pid: int, interval: float = 2.0, grace: float = 60.0) -> None:
    """End this process once the sweep process `pid` is gone (kill -9 leaves orphan jobs).

    An open run is sent SIGTERM and given `grace` seconds to end KILLED with its checkpoint
    saved; then the process exits: a pool worker would otherwise idle on with no sweep.
    One watcher per process, however many jobs the worker runs.
    """
    if pid in watched_launchers:
        return
    watched_launchers.add(pid)

    def watch():
        while store.process_alive(pid):
            time.sleep(interval)
        if run_open.is_set():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while run_open.is_set() and time.monotonic() < deadline:
                time.sleep(0.1)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="segexp-launcher-watch").start()
