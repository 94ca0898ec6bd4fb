"""The exceptions WQS raises. Every one derives from WQSError so callers can catch all."""


class WQSError(Exception):
    """Base class of every WQS error."""


class ConfigError(WQSError):
    """A configuration value is missing, of the wrong type or out of range."""


class DeviceError(WQSError):
    """The device cannot be opened, is too small, or an IO on it failed."""


class NoSpace(DeviceError):
    """The device is full and nothing may be evicted now: every region that could go is
    held by pinned blocks (pins expire by themselves; the put may be tried again)."""


class FormatError(WQSError):
    """The device does not carry a usable WQS format (or must not be formatted)."""


class BlockTooLarge(WQSError):
    """A block exceeds the configured maximum block size."""


class ProtocolError(WQSError):
    """Bytes on the wire do not form a valid WQS frame."""


class AuthError(WQSError):
    """The peer did not prove it knows the shared token."""


class RemoteError(WQSError):
    """The server answered a request with an error status."""


class NodeUnavailable(WQSError):
    """A storage node could not be reached within the configured timeout."""


class TransportUnavailable(WQSError):
    """The configured transport cannot reach a node (transport: shm with no daemon on
    this host, rdma without an RDMA device): the message says why. Not a node outage."""
