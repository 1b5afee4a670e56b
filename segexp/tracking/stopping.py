"""How a process stops: signals raised only where it is safe; sweep jobs that outlive the sweep."""

from __future__ import annotations

import os
import signal
import sys
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

    def __init__(self, signum: int):
        super().__init__(signum)  # args = (signum,): pickles back to the same exception
        self.signum = signum

    def __str__(self) -> str:
        return f"received signal {self.signum}"


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
        resend(signum)
        return
    raise Interrupted(signum)


def resend(signum: int) -> None:
    """Deliver `signum` to the main thread again, SIGNAL_RETRY_SECONDS from now."""
    main = threading.main_thread().ident
    retry = threading.Timer(SIGNAL_RETRY_SECONDS, signal.pthread_kill, (main, signum))
    retry.daemon = True
    retry.start()


def catch_swallowed():
    """Install a `sys.unraisablehook` that re-sends an Interrupted which Python swallowed.

    A signal that lands while a finalizer runs (a weakref callback, a `__del__`: the garbage
    collector calls them anywhere) raises in there, and Python prints "Exception ignored" and
    goes on: Ctrl-C would be lost and the training run on. Returns the hook it replaced.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, Interrupted):
            resend(unraisable.exc_value.signum)  # raised again where it can land
            return
        previous(unraisable)

    sys.unraisablehook = hook
    return previous


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
