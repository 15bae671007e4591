"""Local reward-server processes: start N, wait until each answers ``/health``, stop them.

Each server is ``python -m flowgrpo_core.serving serve-reward NAME --port 0 --ready-file ...``: the
server picks a free port itself and reports its URL in the ready file, so there is no race between
choosing a port and binding it. Servers run in their own session (they outlive the KFP step that
started them) and leave a pid file, so a later step (the pipeline's exit handler) can stop them with
``stop_servers(workdir)``; a pid is only signalled if it still runs our server (pids get reused).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flowgrpo_core.retrying_http import RewardServerError
from flowgrpo_core.serving.client import RewardClient

log = logging.getLogger(__name__)
_MARKER = "flowgrpo_core.serving"


@dataclass
class ServerProcess:
    name: str
    pid: int
    log_path: Path
    pid_path: Path
    url: str | None = None
    process: subprocess.Popen | None = None


class LocalRewardServers:
    """Reward servers as child processes of this machine.

    Args:
        rewards: names, or ``{name: [extra serve-reward arguments]}``
            (e.g. ``{"ocr": ["--option", "rule=reference"], "pickscore": ["--device", "cuda"]}``).
        workdir: where logs, pid and ready files go.
        host: interface the servers bind (127.0.0.1 unless they must be reached from elsewhere).
        startup_timeout_s: how long all servers together may take to load their models.
        env: environment of the servers (default: this process's; put tokens and S3 settings here).
        watch_pid: a process the servers watch (``serve-reward --watch-pid``): each stops cleanly
            within about a second once that process has ended. The servers run in their own session so
            that they outlive the step that started them; give the pid of the process that owns the
            whole run (the pipeline runner), so that they do not outlive it too when it is killed hard
            (SIGKILL) and no exit handler runs. None: they run until stopped.
    """

    def __init__(
        self,
        rewards: Sequence[str] | Mapping[str, Sequence[str]],
        workdir: str | os.PathLike,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 600.0,
        env: Mapping[str, str] | None = None,
        watch_pid: int | None = None,
    ) -> None:
        self.rewards = (
            {name: [] for name in rewards}
            if not isinstance(rewards, Mapping)
            else {k: list(v) for k, v in rewards.items()}
        )
        if not self.rewards:
            raise ValueError("no reward servers to start")
        self.workdir = Path(workdir)
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(env) if env is not None else None
        self.watch_pid = watch_pid
        self.servers: dict[str, ServerProcess] = {}

    def start(self) -> dict[str, str]:
        """Start every server and wait until all answer ``/health``. Returns ``{name: url}``; on any
        failure stops those already started and raises RuntimeError quoting the failing server's log."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for name, extra in self.rewards.items():
                self.servers[name] = self._spawn(name, extra)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self.endpoints()

    def endpoints(self) -> dict[str, str]:
        return {name: server.url for name, server in self.servers.items() if server.url}

    def _spawn(self, name: str, extra: Sequence[str]) -> ServerProcess:
        ready = self.workdir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log_path = self.workdir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            _MARKER,
            "serve-reward",
            name,
            "--host",
            self.host,
            "--port",
            "0",
            "--ready-file",
            str(ready),
            *(["--watch-pid", str(self.watch_pid)] if self.watch_pid is not None else []),
            *extra,
        ]
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        pid_path = self.workdir / f"{name}.pid"
        pid_path.write_text(json.dumps({"name": name, "pid": process.pid}))
        log.info("started reward server %r (pid %d, log %s)", name, process.pid, log_path)
        return ServerProcess(name, process.pid, log_path, pid_path, process=process)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = dict(self.servers)
        while pending:
            for name, server in list(pending.items()):
                code = server.process.poll() if server.process else None
                if code is not None:
                    raise RuntimeError(
                        f"reward server {name!r} exited with code {code} while starting:\n{_tail(server.log_path)}"
                    )
                ready = self.workdir / f"{name}.ready.json"
                if ready.is_file():
                    server.url = json.loads(ready.read_text())["url"]
                    server.pid_path.write_text(
                        json.dumps({"name": name, "pid": server.pid, "url": server.url})
                    )
                    try:
                        RewardClient(server.url, name, timeout_s=5).health(
                            deadline_s=min(30.0, self.startup_timeout_s)
                        )
                    except RewardServerError as error:
                        raise RuntimeError(
                            f"reward server {name!r} started but /health fails: {error}\n{_tail(server.log_path)}"
                        ) from None
                    del pending[name]
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}:\n{_tail(s.log_path)}" for n, s in pending.items())
                raise TimeoutError(
                    f"reward server(s) {sorted(pending)} not ready after {self.startup_timeout_s:g} s:\n{tails}"
                )
            time.sleep(0.1)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every server, SIGKILL those still running after ``timeout_s``."""
        for server in self.servers.values():
            _terminate(server.pid, server.process, timeout_s)
            server.pid_path.unlink(missing_ok=True)
            (self.workdir / f"{server.name}.ready.json").unlink(missing_ok=True)
        self.servers.clear()

    def __enter__(self) -> LocalRewardServers:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_servers(workdir: str | os.PathLike, timeout_s: float = 10.0) -> list[str]:
    """Stop the servers whose pid files are in ``workdir`` (from another process). Returns their names."""
    stopped = []
    for pid_path in sorted(Path(workdir).glob("*.pid")):
        try:
            info = json.loads(pid_path.read_text())
            pid = int(info["pid"])
        except (ValueError, KeyError, OSError):
            log.warning("ignoring unreadable pid file %s", pid_path)
            continue
        if _is_our_server(pid):
            _terminate(pid, None, timeout_s)
            stopped.append(str(info.get("name", pid_path.stem)))
        pid_path.unlink(missing_ok=True)
    return stopped


def _is_our_server(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone (or not Linux: then we do not risk signalling a stranger)
    return _MARKER.encode() in cmdline and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _alive(pid: int, process: subprocess.Popen | None) -> bool:
    if process is not None:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _terminate(pid: int, process: subprocess.Popen | None, timeout_s: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        if not _alive(pid, process):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while _alive(pid, process) and time.monotonic() < deadline:
            time.sleep(0.05)
    if _alive(pid, process):
        log.warning("reward server pid %d did not stop", pid)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
