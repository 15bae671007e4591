"""What ``flowgrpo run`` prints while kfp.local runs the DAG.

kfp.local streams every step's output (the executor's JSON, library warnings, progress bars of model
loading) into this process's stdout, a thousand lines for a tiny run. :func:`routed_console` sends all of
it to the run's log file and lets through to the terminal only our own lines (``[flowgrpo] ...``), a line
as each step starts (and one when a step fails) and, on a terminal, the training's epoch bar redrawn in
place; ``verbose`` shows everything as well. When a step fails, :func:`failure_report` picks out of the log the step, the
tail of its output and its reason (the last exception line), for the error that ends the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OURS = re.compile(r"^\[flowgrpo\]")
_TASK_START = re.compile(r"Executing task '([\w-]+)'")
_TASK_END = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
# the trainer's epoch bar (tqdm, desc "epochs"); the other bars (loading, sampling) stay in the log
_EPOCH_BAR = re.compile(r"^epochs:\s+\d+%\|")
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)|[A-Za-z_][\w.]*Failed): (.+)")
TAIL_LINES = 25


class ConsoleRouter:
    """A text stream for ``sys.stdout``/``sys.stderr``: every line to ``log``; to ``console`` the lines
    that are ours (everything with ``verbose``)."""

    encoding, errors = "utf-8", "replace"

    def __init__(self, log: TextIO, console: TextIO, verbose: bool, tty: bool) -> None:
        self.log, self.console, self.verbose, self.tty = log, console, verbose, tty
        self._partial = ""
        self._bar_shown = False

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = re.split(r"\r\n|\r|\n", self._partial)
        for line in lines:
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return False  # libraries (tqdm, colour logging) then write plain lines, which the log wants

    def fileno(self) -> int:
        return self.log.fileno()

    def _line(self, line: str) -> None:
        plain = _ANSI.sub("", line)
        self.log.write(plain + "\n")
        if self.verbose:
            self._show(line)
            return
        text = plain.strip()
        if _OURS.match(text):
            self._show(text)
        elif match := _TASK_START.search(text):
            self._show(f"[flowgrpo] step {match.group(1)} ...")
        elif (match := _TASK_END.search(text)) and match.group(2) != "SUCCESS":
            self._show(f"[flowgrpo] step {match.group(1)} {match.group(2)}")
        elif self.tty and _EPOCH_BAR.match(text):
            self.console.write("\r\x1b[K" + text)
            self.console.flush()
            self._bar_shown = True

    def _show(self, line: str) -> None:
        if self._bar_shown:
            self.console.write("\n")
            self._bar_shown = False
        self.console.write(line + "\n")
        self.console.flush()


@contextlib.contextmanager
def routed_console(log_path: str | Path, verbose: bool = False) -> Iterator[Path]:
    """Route this process's output (Python streams, and file descriptors 1 and 2, so that library loggers
    bound to the old streams and child processes land there too) into ``log_path``; yields its path.
    Our lines still reach the terminal (see :class:`ConsoleRouter`)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console = open(os.dup(saved[1]), "w", buffering=1, errors="replace")  # noqa: SIM115 (closed below)
    tty = console.isatty()
    old_streams = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1, errors="replace") as log:
        router = ConsoleRouter(log, console, verbose, tty)
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        sys.stdout = sys.stderr = router
        try:
            yield log_path
        finally:
            if router._partial:
                router.write("\n")
            if router._bar_shown:
                console.write("\n")
            sys.stdout, sys.stderr = old_streams
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            console.close()


@dataclass
class StepFailure:
    step: str  # the KFP task, e.g. train-grpo
    reason: str  # its last exception line, or a pointer to the log
    tail: list[str]  # the last lines of its output


def failure_report(log_path: str | Path, tail_lines: int = TAIL_LINES) -> StepFailure | None:
    """The step that failed in the run's log: its name, the last ``tail_lines`` lines of its output and
    its reason (the last ``SomeError: message`` line of its output); None when no step failed."""
    step, block, failed = None, [], None
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if match := _TASK_START.search(line):
            step, block = match.group(1), []
        elif (match := _TASK_END.search(line)) and match.group(2) != "SUCCESS":
            failed = StepFailure(match.group(1), "", block)
            break
        elif step is not None:
            block.append(line)
    if failed is None:
        return None
    lines = [line.strip() for line in failed.tail if line.strip()]
    reasons = [m for line in lines if (m := _EXCEPTION.match(line))]
    failed.reason = f"{reasons[-1].group(1)}: {reasons[-1].group(2)}" if reasons else "see the log"
    failed.tail = lines[-tail_lines:]
    return failed
