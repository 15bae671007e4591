"""``flowgrpo serve-reward NAME``: run one reward server in the foreground until SIGTERM / Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

DESCRIPTION = """Serve one reward model over HTTP: POST /score {"prompts": [...], "images": [base64 PNG...],
"metadata": [...]} -> {"scores": [...], "details": {...}}; GET /health -> name, version, device, limits.
Concurrent requests are merged into batches of at most --max-batch images. Binds 127.0.0.1 unless
--host says otherwise; set a bearer token (--token-env) before exposing it."""

EPILOG = """examples:
  flowgrpo serve-reward ocr --port 18001
  flowgrpo serve-reward pickscore --port 18002 --device cuda --dtype float16
  flowgrpo serve-reward aesthetic --model s3://models/clip-l14 --option head=s3://models/aesthetic.pth
  flowgrpo serve-reward unifiedreward --option url=http://gpu-node:17140/v1
  FLOWGRPO_REWARD_TOKEN=secret flowgrpo serve-reward clipscore --host 0.0.0.0 --port 18003
"""


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
        type=int,
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
        type=int,
        default=16,
        help="images per model call; concurrent requests are merged up to it (default: 16)",
    )
    limits.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a batch waits for more requests (default: 5)",
    )
    limits.add_argument("--max-items", type=int, default=64, help="images per request (default: 64)")
    limits.add_argument(
        "--max-body-mb", type=float, default=256.0, help="largest request body in MiB (default: 256)"
    )
    limits.add_argument(
        "--max-image-pixels",
        type=int,
        default=2048 * 2048,
        help="largest width*height of one image (default: 4194304)",
    )
    limits.add_argument(
        "--max-image-side",
        type=int,
        default=4096,
        help="largest width or height of one image (default: 4096)",
    )
    limits.add_argument(
        "--read-timeout-s",
        type=float,
        default=30.0,
        help="deadline to receive one request body (default: 30)",
    )
    limits.add_argument(
        "--max-connections", type=int, default=64, help="open connections before answering 503 (default: 64)"
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


def serve_reward_command(args: argparse.Namespace) -> int:
    from flowgrpo_core.rewards import build_reward
    from flowgrpo_core.serving.protocol import Limits
    from flowgrpo_core.serving.server import RewardServer

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("flowgrpo.reward_server")
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
    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_items=args.max_items,
        max_image_pixels=args.max_image_pixels,
        max_image_side=args.max_image_side,
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
        )
    except OSError as error:  # port taken, address not on this machine
        print(
            f"flowgrpo serve-reward: error: cannot listen on {args.host}:{args.port}: {error}",
            file=sys.stderr,
        )
        return 2
    # serve_forever runs in a thread so that SIGTERM (from the process manager or Kubernetes) can stop it
    # from the main thread: httpd.shutdown() deadlocks when called from the serving thread itself
    stop = threading.Event()
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
