"""Serve a registered model over HTTP with Ray Serve, in the foreground until Ctrl-C: a web page at /,
POST /inpaint (multipart fields image and mask, white = hole; returns the filled PNG), GET /model, GET /healthz.

python jobs/serve.py --model models:/inpaint-fused-unet@best [--tracking-uri URI] [--host 127.0.0.1] [--port 8000]

It starts a local Ray of its own. The model is loaded once before Serve starts, so that a URI that does not load
stops here with one line naming it. Moving the alias takes effect within --alias-poll-s seconds (default 30),
with no request dropped; on a cluster, deploy deploy/serve-config.yaml with `serve deploy` (docs/serving.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import time

import ray
from ray import serve

from inpaint import fill, tracking
from inpaint.errors import UserError, cli_errors
from inpaint.runtime import configure_process
from inpaint.serve import DEFAULT_MODEL, SETTINGS, build_app, load_served, settings_from


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="URI", help=f"the model (default {DEFAULT_MODEL})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 opens it to the network)"
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=int, default=1, help="model replicas, 1 CPU each (default 1)")
    parser.add_argument("--mode", choices=fill.MODES, default=SETTINGS["mode"], help="default fill mode")
    parser.add_argument(
        "--max-batch-size", type=int, default=SETTINGS["max_batch_size"], help="dynamic batch size; 1 turns it off"
    )
    parser.add_argument("--alias-poll-s", type=float, default=SETTINGS["alias_poll_s"], help="0: never re-resolve")
    parser.add_argument("--max-pixels", type=int, default=SETTINGS["max_pixels"], help="largest image accepted")
    parser.add_argument("--max-body-bytes", type=int, default=SETTINGS["max_body_bytes"], help="largest request")
    return parser.parse_args(argv)


def check_port(host: str, port: int) -> None:
    """Stop with one line if `port` is taken: Serve's proxy would otherwise retry it in the background."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port") from None


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) is this machine's loopback: only local clients reach it."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


@cli_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_process()
    tracking_uri = tracking.resolve_tracking_uri(args.tracking_uri)
    settings = settings_from(
        {
            "model": args.model,
            "tracking_uri": tracking_uri,
            "mode": args.mode,
            "max_batch_size": args.max_batch_size,
            "alias_poll_s": args.alias_poll_s,
            "max_pixels": args.max_pixels,
            "max_body_bytes": args.max_body_bytes,
        }
    )
    check_port(args.host, args.port)
    served = load_served(args.model, tracking_uri)  # fails here, naming the URI, rather than in a replica
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who reaches it can use the model (no login; docs/serving.md)")
    ray.init(address="local", include_dashboard=False, configure_logging=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(settings | {"num_replicas": args.replicas}), name="inpaint", route_prefix="/")
        print(f"serving {served.info['load_uri']} ({args.model}) at http://{args.host}:{args.port}/  (Ctrl-C stops)")
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM as on Ctrl-C
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
