"""The embedded Dask cluster: every socket on 127.0.0.1 unless compute.host says otherwise; a dashboard only
when asked for."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from helpers.servers import listening

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


@pytest.mark.parametrize(("processes", "dashboard"), [(False, False), (False, True), (True, False), (True, True)])
def test_every_socket_of_the_local_cluster_listens_on_loopback_only(processes, dashboard):
    before = listening()
    with dask_client(ComputeConfig(processes=processes, dashboard=dashboard, workers=2 if processes else 1)) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        opened = listening() - before
    # scheduler, workers, nannies and every HTTP endpoint: a scheduler and a worker endpoint at least
    assert len(opened) >= (2 + 2 * 2 if processes else 2), opened
    assert {address for address, _ in opened} == {"127.0.0.1"}, opened


def test_compute_host_exposes_the_cluster_on_purpose():
    before = listening()
    with dask_client(ComputeConfig(host="0.0.0.0")):
        opened = listening() - before
    assert opened and {address for address, _ in opened} == {"0.0.0.0"}, opened
