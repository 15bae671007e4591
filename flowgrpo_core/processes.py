"""Stopping what a local pipeline started: signals turned into an exception, and a process tree stopped politely
first (SIGINT, so Python children run their ``finally`` blocks and close their MLflow runs), then firmly."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator

import psutil


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no ``except Exception`` in
    library code swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


@contextlib.contextmanager
def interrupt_on_signals(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Inside the block, the given signals raise :class:`Interrupted` in the main thread (also when the
    process inherited SIGINT ignored, as background jobs of a shell do). Previous handlers come back after."""
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handler(signum, frame):
        raise Interrupted(signum)

    for signum in signals:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def signals_ignored(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """A second Ctrl-C must not interrupt the clean-up of the first."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_children(grace_s: float = 5.0, term_s: float = 5.0) -> list[int]:
    """Stop every descendant of this process: SIGINT, then SIGTERM after ``grace_s``, then SIGKILL after
    ``term_s``. Returns the pids that were running."""
    children = psutil.Process().children(recursive=True)
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, term_s), (signal.SIGKILL, 5.0)):
        alive = [p for p in children if _running(p)]
        if not alive:
            break
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_running(p) for p in alive):
            time.sleep(0.05)
    return [p.pid for p in children]


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
