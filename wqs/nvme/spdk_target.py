"""What an SPDK device name says, and what an NVMe completion status means: pure parts
of the SPDK backend (spdk.py), no library needed.

A device is named `spdk:` followed by an SPDK transport ID and the namespace, in SPDK's
own `key:value` syntax (the one `spdk_nvme_perf -r` takes):

    spdk:trtype:PCIe traddr:0000:01:00.0 ns:1
    spdk:trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.2016-06.io.spdk:cnode1 ns:1

`parse_device` checks the keys and values here, so a typo is a configuration error that
names the key instead of an SPDK log line; the transport ID itself (everything but
`ns`) is handed to `spdk_nvme_transport_id_parse` as written.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from wqs.errors import ConfigError

PREFIX = "spdk:"
TRTYPES = {"pcie": "PCIe", "tcp": "TCP", "rdma": "RDMA", "fc": "FC", "vfiouser": "VFIOUSER"}
ADRFAMS = {"ipv4": "IPv4", "ipv6": "IPv6", "ib": "IB", "fc": "FC"}
# Field limits of struct spdk_nvme_transport_id (include/spdk/nvme.h), less the NUL.
_MAX = {"traddr": 256, "trsvcid": 32, "subnqn": 223, "hostnqn": 223, "hostaddr": 256,
        "hostsvcid": 32, "priority": 32}
_KEYS = ("trtype", "adrfam", "traddr", "trsvcid", "subnqn", "hostnqn", "hostaddr",
         "hostsvcid", "priority", "ns")
_PCI_ADDR = re.compile(r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
MAX_NSID = 0xFFFFFFFE


def is_spdk_device(device: str | None) -> bool:
    return isinstance(device, str) and device.startswith(PREFIX)


@dataclass(frozen=True)
class SpdkTarget:
    """One namespace behind an SPDK transport ID."""

    trtype: str  # "PCIe", "TCP", ... (SPDK's spelling)
    traddr: str
    ns: int
    adrfam: str | None = None
    trsvcid: str | None = None
    subnqn: str | None = None
    hostnqn: str | None = None
    hostaddr: str | None = None
    hostsvcid: str | None = None
    priority: str | None = None

    @property
    def is_pcie(self) -> bool:
        return self.trtype == "PCIe"

    def trid(self) -> str:
        """The transport ID string for spdk_nvme_transport_id_parse (no ns, no host
        keys: those are the host's, not the controller's)."""
        parts = [f"trtype:{self.trtype}"]
        for key in ("adrfam", "traddr", "trsvcid", "subnqn", "priority"):
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}:{value}")
        return " ".join(parts)

    def name(self) -> str:
        """The device name as the configuration spells it, normalised."""
        extra = [f"{k}:{getattr(self, k)}" for k in ("hostnqn", "hostaddr", "hostsvcid")
                 if getattr(self, k) is not None]
        return f"{PREFIX}{' '.join([self.trid(), *extra, f'ns:{self.ns}'])}"

    def where(self) -> str:
        """The controller in a few words, for error messages."""
        if self.is_pcie:
            return f"PCIe controller {self.traddr}"
        port = f":{self.trsvcid}" if self.trsvcid else ""
        nqn = f" ({self.subnqn})" if self.subnqn else ""
        return f"NVMe-oF {self.trtype} controller {self.traddr}{port}{nqn}"


def parse_device(device: str, key: str = "device") -> SpdkTarget:
    """`spdk:<transport ID> ns:<n>` -> SpdkTarget; ConfigError naming `key` if it is not
    one. Keys are case-insensitive; values are split at the first ':' (or '=')."""
    if not is_spdk_device(device):
        raise ConfigError(f"{key}: an SPDK device starts with {PREFIX!r}, got {device!r}")
    fields: dict[str, str] = {}
    for word in device[len(PREFIX):].split():
        k, sep, v = _split_pair(word)
        if not sep or not v:
            raise ConfigError(f"{key}: {word!r} is not key:value (in {device!r})")
        k = k.lower()
        if k not in _KEYS:
            raise ConfigError(f"{key}: unknown transport ID key {k!r} (known: "
                              f"{', '.join(_KEYS)}) in {device!r}")
        if k in fields:
            raise ConfigError(f"{key}: {k} is given twice in {device!r}")
        if k in _MAX and len(v) > _MAX[k]:
            raise ConfigError(f"{key}: {k} is longer than {_MAX[k]} characters in {device!r}")
        fields[k] = v
    if "trtype" not in fields:
        raise ConfigError(f"{key}: trtype is missing (trtype:PCIe or trtype:TCP, ...) "
                          f"in {device!r}")
    trtype = TRTYPES.get(fields["trtype"].lower())
    if trtype is None:
        raise ConfigError(f"{key}: trtype must be one of {', '.join(TRTYPES.values())}, "
                          f"got {fields['trtype']!r}")
    fields["trtype"] = trtype
    if "traddr" not in fields:
        raise ConfigError(f"{key}: traddr is missing (a PCI address or an IP address) "
                          f"in {device!r}")
    if "ns" not in fields:
        raise ConfigError(f"{key}: ns is missing (the namespace ID, ns:1) in {device!r}")
    ns = fields.pop("ns")
    if not ns.isdigit() or not 1 <= int(ns) <= MAX_NSID:
        raise ConfigError(f"{key}: ns must be a namespace ID in 1..{MAX_NSID}, got {ns!r}")
    if trtype == "PCIe":
        if not _PCI_ADDR.match(fields["traddr"]):
            raise ConfigError(f"{key}: traddr of a PCIe device is a PCI address such as "
                              f"0000:01:00.0, got {fields['traddr']!r}")
        for k in ("adrfam", "trsvcid", "subnqn"):
            if k in fields:
                raise ConfigError(f"{key}: {k} is for NVMe over fabrics, not PCIe")
    else:
        if "adrfam" in fields:
            adrfam = ADRFAMS.get(fields["adrfam"].lower())
            if adrfam is None:
                raise ConfigError(f"{key}: adrfam must be one of "
                                  f"{', '.join(ADRFAMS.values())}, got {fields['adrfam']!r}")
            fields["adrfam"] = adrfam
        if "trsvcid" not in fields:
            raise ConfigError(f"{key}: trsvcid (the port, e.g. 4420) is missing for "
                              f"trtype:{trtype} in {device!r}")
        if trtype in ("TCP", "RDMA") and not (fields["trsvcid"].isdigit()
                                              and 1 <= int(fields["trsvcid"]) <= 65535):
            raise ConfigError(f"{key}: trsvcid must be a port in 1..65535, "
                              f"got {fields['trsvcid']!r}")
        if "subnqn" not in fields:
            raise ConfigError(f"{key}: subnqn (the subsystem's NQN) is missing for "
                              f"trtype:{trtype} in {device!r}")
    return SpdkTarget(ns=int(ns), **fields)


def _split_pair(word: str) -> tuple[str, str, str]:
    """'key:value' or 'key=value', split at whichever separator comes first (a PCI or
    IPv6 address holds more ':' in its value)."""
    cut = min((i for i in (word.find(":"), word.find("=")) if i >= 0), default=-1)
    if cut < 0:
        return word, "", ""
    return word[:cut], word[cut], word[cut + 1:]


# --------------------------------------------------------------------------- statuses
# NVMe completion status: status code type (SCT) and status code (SC), from the NVMe
# base specification (SPDK's include/spdk/nvme_spec.h names them). Only what a read or
# a write can meet is named; the rest is reported by number.

SCT_GENERIC, SCT_COMMAND_SPECIFIC, SCT_MEDIA, SCT_PATH = 0, 1, 2, 3

_GENERIC = {
    0x01: ("invalid opcode", errno.EINVAL),
    0x02: ("invalid field in command", errno.EINVAL),
    0x04: ("data transfer error", errno.EIO),
    0x05: ("aborted: power loss", errno.EIO),
    0x06: ("internal device error", errno.EIO),
    0x07: ("aborted by request", errno.ECANCELED),
    0x08: ("aborted: queue deleted (controller disconnected or reset)", errno.ENXIO),
    0x0B: ("invalid namespace or format", errno.ENXIO),
    0x15: ("operation denied", errno.EACCES),
    0x19: ("keep alive expired", errno.ENXIO),
    0x20: ("namespace is write protected", errno.EROFS),
    0x22: ("transient transport error", errno.EAGAIN),
    0x80: ("LBA out of range", errno.EINVAL),
    0x81: ("capacity exceeded", errno.ENOSPC),
    0x82: ("namespace not ready", errno.EAGAIN),
    0x83: ("reservation conflict", errno.EBUSY),
}
_MEDIA = {
    0x80: ("write fault", errno.EIO),
    0x81: ("unrecovered read error", errno.EIO),
    0x82: ("end-to-end guard check error", errno.EIO),
    0x85: ("compare failure", errno.EIO),
    0x86: ("access denied", errno.EACCES),
}
_COMMAND_SPECIFIC = {
    0x80: ("conflicting attributes", errno.EINVAL),
    0x82: ("write to a read-only range", errno.EROFS),
}
_TABLES = {SCT_GENERIC: _GENERIC, SCT_COMMAND_SPECIFIC: _COMMAND_SPECIFIC,
           SCT_MEDIA: _MEDIA}


def split_status(status: int) -> tuple[int, int]:
    """The 16-bit status word of struct spdk_nvme_cpl (phase tag in bit 0, SC in bits
    1-8, SCT in bits 9-11) -> (sct, sc)."""
    return (status >> 9) & 0x7, (status >> 1) & 0xFF


def status_errno(sct: int, sc: int) -> int:
    """The errno an IO ring reports for a failed command (0 for success)."""
    if sct == 0 and sc == 0:
        return 0
    if sct == SCT_PATH:
        return errno.ENXIO  # the path to the namespace is gone
    entry = _TABLES.get(sct, {}).get(sc)
    return entry[1] if entry else errno.EIO


def describe_status(sct: int, sc: int) -> str:
    """The status in words, with its numbers (what an operator looks up)."""
    if sct == 0 and sc == 0:
        return "success"
    entry = _TABLES.get(sct, {}).get(sc)
    what = entry[0] if entry else ("path error" if sct == SCT_PATH else "error")
    return f"{what} (NVMe status type {sct:#x}, code {sc:#04x})"


# --------------------------------------------------------------------------- namespaces

UNIT = 4096  # the engine's unit (wqs/engine/format.py): every IO is a multiple of it


def check_namespace(where: str, ns: int, *, active: bool, sector_size: int,
                    size: int, md_size: int = 0, extended_lba: bool = False,
                    pi_type: int = 0, active_ids: tuple[int, ...] = ()) -> int:
    """Whether the engine can use this namespace; the usable size in bytes (whole units).

    The engine does every IO in 4 KiB units, so the sector size must divide 4096; it
    keeps no protection information or metadata, so a format with either is refused
    rather than half used."""
    from wqs.errors import DeviceError

    if not active:
        have = ", ".join(str(i) for i in active_ids[:16]) or "none"
        raise DeviceError(f"{where}: namespace {ns} does not exist or is not active "
                          f"(active namespaces: {have})")
    if sector_size <= 0 or sector_size > UNIT or UNIT % sector_size:
        raise DeviceError(f"{where}: namespace {ns} has {sector_size} B sectors; WQS needs "
                          f"a sector size that divides {UNIT} (512 or 4096): reformat the "
                          "namespace with such an LBA format")
    if md_size or extended_lba or pi_type:
        raise DeviceError(f"{where}: namespace {ns} is formatted with {md_size} B of "
                          f"metadata per sector{' (protection information type %d)' % pi_type if pi_type else ''}; "
                          "WQS needs an LBA format without metadata")
    usable = size // UNIT * UNIT
    if usable < UNIT:
        raise DeviceError(f"{where}: namespace {ns} holds {size} B, less than one "
                          f"{UNIT} B unit")
    return usable
