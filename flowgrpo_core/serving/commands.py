"""``flowgrpo serve-reward NAME``: run one reward server in the foreground until SIGTERM / Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("flowgrpo.reward_server")

DESCRIPTION = """Serve one reward model over HTTP: POST /score {"prompts": [...], "images": [base64 PNG...],
"metadata": [...]} -> {"scores": [...], "details": {...}}; GET /health -> name, version, device, limits.
Concurrent requests are merged into batches of at most --max-batch images. Binds 127.0.0.1 unless
--host says otherwise; set a bearer token (--token-env) before exposing it."""

EPILOG = """memory and time:
  The limits bound decoded memory, not only bytes on the wire: a request's images hold at most
  --max-request-pixels (256 MiB of RGB at the default), the whole server at most --max-pending-pixels
  (a 503 with Retry-After beyond it), and the JSON body is parsed field by field, so junk JSON costs
  about its own size. A whole request must arrive within --read-timeout-s of its first byte (else 408).
  Measured 2026-12-03 on a 2-core machine, server RSS above idle, before -> after these limits:
    32 MiB of JSON lists ([[],[],...])       3.6 s, +835 MB  -> 0.04 s, 400, +34 MB
    64 blank 2048x2048 PNGs (1.5 MiB body)   3.5 s, +1076 MB, 1030 MB kept -> 0.01 s, 413, +2 MB
    16 blank 2048x2048 PNGs (the limit)      1.1 s, +303 MB, 259 MB kept -> 1.2 s, +303 MB, 3 MB kept
    shapes_geneval, one 2048x2048 image      6.9 s, +1.6 GB  -> 0.5 s, +130 MB

examples:
  flowgrpo serve-reward ocr --port 18001
  flowgrpo serve-reward pickscore --port 18002 --device cuda --dtype float16
  flowgrpo serve-reward aesthetic --model s3://models/clip-l14 --option head=s3://models/aesthetic.pth
  flowgrpo serve-reward unifiedreward --option url=http://gpu-node:17140/v1
  FLOWGRPO_REWARD_TOKEN=secret flowgrpo serve-reward clipscore --host 0.0.0.0 --port 18003
  flowgrpo serve-reward brightness --port 0 --ready-file ready.json --watch-pid $PPID
"""


def _integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a decimal integer in [low, high]; argparse names the option in its error."""

    def parse(text: str) -> int:
        # ASCII digits only: int() would also take '١٢' and '1_000'
        if not re.fullmatch(r"-?[0-9]{1,19}", text.strip()):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        value = int(text)
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _number(low: float, high: float, low_inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number above ``low`` (or equal, if ``low_inclusive``), at most ``high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value > high or value < low or (value == low and not low_inclusive):
            sign = ">=" if low_inclusive else ">"
            raise argparse.ArgumentTypeError(
                f"must be a finite number {sign} {low:g} and <= {high:g}, got {text!r}"
            )
        return value

    return parse


_PORT = _integer(0, 65535)
_COUNT = _integer(1)
# a day at most: a socket timeout of 1e12 s overflows (OverflowError), and anything near it is a typo
_SECONDS = _number(0.0, 86400.0)


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with an identifier key, got {text!r}")
    try:
        return key, json.loads(value)  # numbers, booleans, null
    except ValueError:
        return key, value


def add_serve_reward_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve-reward`` to the ``flowgrpo`` command line."""
    from flowgrpo_core.rewards import REWARD_NAMES, available_in_process

    names = available_in_process()
    parser = subparsers.add_parser(
        "serve-reward",
        help="serve one reward model over HTTP (POST /score, GET /health)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name",
        choices=names,
        metavar="NAME",
        help="reward to serve: " + "; ".join(f"{n} ({REWARD_NAMES[n]})" for n in names),
    )
    net = parser.add_argument_group("network")
    net.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; 0.0.0.0 exposes it)"
    )
    net.add_argument(
        "--port",
        type=_PORT,
        default=18000,
        help="TCP port; 0 picks a free one (see --ready-file) (default: 18000)",
    )
    net.add_argument(
        "--token-env",
        default="FLOWGRPO_REWARD_TOKEN",
        metavar="VAR",
        help="environment variable holding the bearer token /score requires; unset or empty: no token "
        "(a token is never passed on the command line, where `ps` would show it) "
        "(default: FLOWGRPO_REWARD_TOKEN)",
    )
    net.add_argument(
        "--ready-file",
        type=Path,
        metavar="PATH",
        help="once serving, write {name, url, pid} as JSON here (used by the process manager)",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", help="weights: hub id, local folder or s3://bucket/prefix (default: the reward's own)"
    )
    model.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    model.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the reward's own, usually auto)")
    model.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="weights dtype of torch rewards (default: float32)",
    )
    model.add_argument(
        "--option",
        dest="options",
        action="append",
        default=[],
        type=_option,
        metavar="KEY=VALUE",
        help="extra reward option, e.g. rule=reference (ocr), head=PATH (aesthetic), url=URL "
        "(unifiedreward); VALUE is parsed as JSON when it can be (repeatable)",
    )
    limits = parser.add_argument_group("batching and limits")
    limits.add_argument(
        "--max-batch",
        type=_COUNT,
        default=16,
        help="images per model call; concurrent requests are merged up to it (default: 16)",
    )
    limits.add_argument(
        "--batch-wait-ms",
        type=_number(0.0, 60_000.0, low_inclusive=True),
        default=5.0,
        help="how long a batch waits for more requests (default: 5)",
    )
    limits.add_argument("--max-items", type=_COUNT, default=64, help="images per request (default: 64)")
    limits.add_argument(
        "--max-body-mb",
        type=_number(0.0, 2.0**20),
        default=256.0,
        help="largest request body in MiB (default: 256)",
    )
    limits.add_argument(
        "--max-image-pixels",
        type=_COUNT,
        default=2048 * 2048,
        help="largest width*height of one image (default: 4194304)",
    )
    limits.add_argument(
        "--max-image-side",
        type=_COUNT,
        default=4096,
        help="largest width or height of one image (default: 4096)",
    )
    limits.add_argument(
        "--max-request-pixels",
        type=_COUNT,
        default=64 * 1024 * 1024,
        help="largest width*height summed over the images of one request, what bounds its decoded "
        "memory at 4 bytes a pixel (default: 67108864, 64 images of 1024x1024: 256 MiB)",
    )
    limits.add_argument(
        "--max-pending-pixels",
        type=_COUNT,
        help="decoded pixels of all requests in the server at once (being decoded, queued or scored); "
        "a request that would pass it gets a 503 before decoding (default: twice --max-request-pixels)",
    )
    limits.add_argument(
        "--read-timeout-s",
        type=_SECONDS,
        default=30.0,
        help="deadline to receive a whole request (request line, headers and body) from its first byte, "
        "and the longest wait for any one recv (default: 30)",
    )
    limits.add_argument(
        "--max-connections",
        type=_COUNT,
        default=64,
        help="open connections before answering 503 (default: 64)",
    )
    parser.add_argument(
        "--watch-pid",
        type=_COUNT,
        metavar="PID",
        help="stop cleanly (exit 0) once process PID has ended, checked every second; its start time is "
        "recorded at startup, so a new process that reuses the pid does not count (Linux /proc)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="server log level (default: info)",
    )
    parser.set_defaults(func=serve_reward_command)


def reward_options(args: argparse.Namespace) -> dict:
    """The options given on the command line, for ``build_reward(name, **options)``."""
    options = {
        key: getattr(args, key)
        for key in ("model", "revision", "device", "dtype")
        if getattr(args, key) is not None
    }
    options.update(dict(args.options))
    return options


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started (field 22 of /proc/PID/stat, clock ticks since boot); None when
    there is no such process or it has ended (a zombie waiting for its parent counts as ended).

    A pid names a process only while it lives: once it ended, the kernel may give the number to a new
    process, which has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces and ')'
    fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3, the state
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def watch_process(
    pid: int, start_time: int, stop: threading.Event, interval_s: float = 1.0
) -> threading.Thread:
    """A daemon thread that sets ``stop`` once process ``pid`` (started at ``start_time``) has ended."""

    def watch() -> None:
        while not stop.wait(interval_s):
            if process_start_time(pid) != start_time:
                log.warning("watched process %d has ended; stopping the reward server", pid)
                stop.set()

    thread = threading.Thread(target=watch, name=f"watch-pid-{pid}", daemon=True)
    thread.start()
    return thread


def serve_reward_command(args: argparse.Namespace) -> int:
    from flowgrpo_core.rewards import build_reward
    from flowgrpo_core.serving.protocol import Limits
    from flowgrpo_core.serving.server import RewardServer

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    max_pending_pixels = args.max_pending_pixels or 2 * args.max_request_pixels
    if max_pending_pixels < args.max_request_pixels:
        print(
            f"flowgrpo serve-reward: error: --max-pending-pixels ({max_pending_pixels}) is below "
            f"--max-request-pixels ({args.max_request_pixels}): a request at the limit could never be served",
            file=sys.stderr,
        )
        return 2
    # serve_forever runs in a thread so that SIGTERM (from the process manager or Kubernetes) can stop it
    # from the main thread: httpd.shutdown() deadlocks when called from the serving thread itself
    stop = threading.Event()
    if args.watch_pid is not None:
        start_time = process_start_time(args.watch_pid)
        if start_time is None:
            print(
                f"flowgrpo serve-reward: error: --watch-pid {args.watch_pid}: no such running process "
                "(or no /proc to read it from)",
                file=sys.stderr,
            )
            return 2
        # watched from now on: a pipeline killed while the model loads must not leave the server behind
        watch_process(args.watch_pid, start_time, stop)
        log.info("watching process %d: the server stops when it ends", args.watch_pid)
    token = os.environ.get(args.token_env) or None
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a bearer token: anyone who can reach it can use it", args.host)
    options = reward_options(args)
    try:
        reward = build_reward(args.name, **options)
    except TypeError as error:  # an option this reward does not take
        print(
            f"flowgrpo serve-reward: error: reward {args.name!r} does not accept {sorted(options)}: {error}",
            file=sys.stderr,
        )
        return 2
    if stop.is_set():  # the watched process ended while the model loaded: nobody is left to serve
        return 0
    limits = Limits(
        max_body_bytes=max(1, int(args.max_body_mb * 2**20)),
        max_items=args.max_items,
        max_image_pixels=args.max_image_pixels,
        max_image_side=args.max_image_side,
        max_request_pixels=args.max_request_pixels,
    )
    try:
        server = RewardServer(
            reward,
            name=args.name,
            host=args.host,
            port=args.port,
            limits=limits,
            max_batch=args.max_batch,
            max_wait_s=args.batch_wait_ms / 1000.0,
            token=token,
            read_timeout_s=args.read_timeout_s,
            max_connections=args.max_connections,
            max_pending_pixels=max_pending_pixels,
        )
    except OSError as error:  # port taken, address not on this machine
        print(
            f"flowgrpo serve-reward: error: cannot listen on {args.host}:{args.port}: {error}",
            file=sys.stderr,
        )
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"name": args.name, "url": server.url, "pid": os.getpid()}))
        tmp.replace(args.ready_file)  # atomic: a reader never sees half a file
    stop.wait()
    log.info("stopping reward %r", args.name)
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m flowgrpo_core.serving serve-reward ...`` (what the process manager runs)."""
    parser = argparse.ArgumentParser(prog="python -m flowgrpo_core.serving")
    add_serve_reward_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"flowgrpo serve-reward: error: {error}", file=sys.stderr)
        return 2
