"""`wsi-mil ui OUT`: the MLflow UI over an output directory's embedded store, on 127.0.0.1.

``--host`` exposes it on purpose (``--host 0.0.0.0``: every interface); the UI has no login, so
anyone who can reach the port can read and change the runs.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from wsi_mil.config import Config
from wsi_mil.errors import WsiMilError
from wsi_mil.layout import Layout

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def ui_command(layout: Layout, port: int, host: str = "127.0.0.1") -> list[str]:
    """The `mlflow ui` command line that serves ``layout``'s store on ``host:port`` (also shown to the user)."""
    return [
        sys.executable, "-m", "mlflow", "ui",  # this Python's mlflow: no `mlflow` script on PATH needed
        "--backend-store-uri", layout.tracking_uri,
        "--default-artifact-root", str(layout.mlflow_artifacts.resolve()),
        "--host", host, "--port", str(port), "--workers", "1",
    ]


def port_busy(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (``"the port is in use"``...), or None when it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not busy
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "the port is in use by another program"
            return exc.strerror or str(exc)
    return None


def cli_ui(args: argparse.Namespace, cfg: Config) -> int:
    """Replace this process by `mlflow ui` over OUT (Ctrl-C stops it)."""
    layout = Layout(args.out)
    if not layout.mlflow_db.is_file():
        raise WsiMilError(f"{layout.mlflow_db} does not exist; run `wsi-mil train` or `wsi-mil run` with --out {args.out} first.")
    host = getattr(args, "host", "127.0.0.1")
    command = ui_command(layout, args.port, host)
    if host not in LOOPBACK:
        log.warning("the MLflow UI listens on %s: anyone who can reach port %d can read and change these runs "
                    "(the UI has no login)", host, args.port)
    shown = f"[{host}]" if ":" in host else host
    busy = port_busy(host, args.port)
    if busy:
        raise WsiMilError(f"cannot serve the MLflow UI on {shown}:{args.port}: {busy}; pass another --port.")
    print(f"MLflow UI on http://{shown}:{args.port}  (Ctrl-C to stop)\n  {' '.join(command)}", flush=True)
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(command[0], command)
    return 0  # pragma: no cover - execv does not return
