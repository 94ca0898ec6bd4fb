"""RDMA probing: the daemon says which transports it serves and why, never silently."""

from tests.daemons import daemon_factory  # noqa: F401 (fixture)
from wqs.rdma import probe


def test_probe_explains_itself():
    result = probe()
    assert result.reason
    assert bool(result.devices) == result.available


def test_daemon_states_its_transport_and_why(daemon_factory):  # noqa: F811
    result = probe()
    d = daemon_factory()
    if result.available:
        assert "RDMA transport: served on " in d.stderr_text()
    else:
        assert f"RDMA transport: not served ({result.reason}); TCP and shared memory only" \
            in d.stderr_text()
    off = daemon_factory(config={"rdma": {"enabled": "off"}})
    assert "RDMA transport: off (rdma.enabled)" in off.stderr_text()
