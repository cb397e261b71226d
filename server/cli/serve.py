"""`plinth serve`: run the gRPC server until SIGTERM or Ctrl-C, then stop it gracefully."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from plinth.server.cli.local import add_local_flags, config, quiet_libraries


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="run the gRPC server")
    p.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: 50051; 0 picks one)")
    p.add_argument("--token-file", type=Path, help="bearer tokens, one per line (required off loopback)")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); with --tls-key serves TLS only")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="CA that client certificates must be signed by (mutual TLS)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    p.add_argument(
        "--batch-jobs",
        type=int,
        metavar="N",
        help="run up to N jobs side by side, their sampler steps batched (default: 0 = 8 on CUDA, 1 on the CPU)",
    )
    p.add_argument("--compile", action="store_const", const=True, help="torch.compile each UNet as it loads")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line, with the job id")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error (default: info)")
    add_local_flags(p)
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    import signal
    import threading

    from plinth.server import logs
    from plinth.server.app import PlinthServer
    from plinth.server.config import ConfigError
    from plinth.server.jobs.store import StoreError

    logs.configure(json=args.log_json, level=args.log_level)
    quiet_libraries()
    try:
        settings = config(
            args,
            host=args.host,
            port=args.port,
            metrics_port=args.metrics_port,
            batch_jobs=args.batch_jobs,
            compile=args.compile,
            **{
                "auth.token_file": args.token_file,
                "auth.tls_cert": args.tls_cert,
                "auth.tls_key": args.tls_key,
                "auth.tls_client_ca": args.tls_client_ca,
            },
        )
        server = PlinthServer(settings).start()
    except (ConfigError, StoreError) as exc:
        print(f"plinth serve: {exc}", file=sys.stderr)
        return 2
    print(f"plinth serving on {server.address}", file=sys.stderr, flush=True)
    stopping = threading.Event()

    def stop(*_: object) -> None:  # SIGTERM or Ctrl-C: finish the running job within the grace period
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.stop, name="plinth-shutdown").start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.wait()
    return 0
