"""RDMA probing: a machine without RDMA says why, and the daemon serves TCP."""

from wqs.rdma import probe


def test_probe_explains_itself():
    result = probe()
    assert isinstance(result.available, bool)
    assert result.reason
    if not result.available:
        assert result.devices == []
    else:
        assert result.devices
