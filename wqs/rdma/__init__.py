"""RDMA transport (RoCE/InfiniBand through pyverbs).

The transport follows the design in wqs/rpc/transport.py: the daemon RDMA-WRITEs GET
payloads into client-registered memory and RDMA-READs PUT payloads from it, and only
control frames travel as SENDs. `wire` (endpoints, regions, credits, link state) and
`link` (one end of a link as a sans-IO machine) decide everything and run anywhere;
`verbs` is the thin layer over pyverbs. `probe()` tells the daemon and tools whether RDMA
can be used here and, if not, exactly why, so that no fallback to TCP is silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RdmaProbe:
    available: bool
    reason: str  # why not, or what was found
    devices: list[str] = field(default_factory=list)


def probe() -> RdmaProbe:
    """Whether pyverbs is importable and lists at least one RDMA device."""
    try:
        from pyverbs import device as verbs_device  # type: ignore[import-not-found]
    except ImportError:
        return RdmaProbe(False, "pyverbs is not installed (Debian: apt install python3-pyverbs)")
    try:
        devices = verbs_device.get_device_list()
    except Exception as e:  # PyverbsRDMAError where the kernel has no RDMA support
        return RdmaProbe(False, f"no RDMA support: {e}")
    names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devices]
    if not names:
        return RdmaProbe(False, "no RDMA device found")
    return RdmaProbe(True, "RDMA devices: " + ", ".join(names), names)
