"""RDMA probing: the daemon says which transport it serves and why, never silently."""

from tests.daemons import daemon_factory  # noqa: F401 (fixture)
from wqs.rdma import probe


def test_probe_explains_itself():
    result = probe()
    assert result.reason
    assert bool(result.devices) == result.available


def test_daemon_states_its_transport_and_why(daemon_factory):  # noqa: F811
    d = daemon_factory()
    reason = probe().reason
    assert f"data-plane transport: tcp (RDMA transport not built yet; {reason})" in \
        d.stderr_text()
