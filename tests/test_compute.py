"""The embedded Dask cluster: a dashboard only when asked for, never a public port otherwise."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from wsi_mil.compute import dask_client
from wsi_mil.config import ComputeConfig


def _status(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("dashboard", [False, True])
def test_dashboard_only_when_asked(dashboard):
    with dask_client(ComputeConfig(dashboard=dashboard)) as client:
        server = client.cluster.scheduler.http_server
        bound = [sock.getsockname() for sock in server._sockets.values()]
        assert bound and all(addr[1] != 8787 for addr in bound)
        if dashboard:
            assert _status(bound[0][1]) == 200
        else:
            assert [addr[0] for addr in bound] == ["127.0.0.1"]  # loopback only, a random port
            assert _status(bound[0][1]) == 404  # no dashboard pages
