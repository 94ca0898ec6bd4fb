from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_STATUS_UNSPECIFIED: _ClassVar[ServingStatus]
    SERVING_STATUS_SERVING: _ClassVar[ServingStatus]
    SERVING_STATUS_DRAINING: _ClassVar[ServingStatus]
    SERVING_STATUS_NOT_SERVING: _ClassVar[ServingStatus]
SERVING_STATUS_UNSPECIFIED: ServingStatus
SERVING_STATUS_SERVING: ServingStatus
SERVING_STATUS_DRAINING: ServingStatus
SERVING_STATUS_NOT_SERVING: ServingStatus

class GetChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetChallengeResponse(_message.Message):
    __slots__ = ("server_nonce", "ttl_seconds", "auth_required")
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    server_nonce: bytes
    ttl_seconds: float
    auth_required: bool
    def __init__(self, server_nonce: _Optional[bytes] = ..., ttl_seconds: _Optional[float] = ..., auth_required: bool = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "node_id", "uptime_seconds", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: ServingStatus
    node_id: str
    uptime_seconds: float
    message: str
    def __init__(self, status: _Optional[_Union[ServingStatus, str]] = ..., node_id: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LatencySummary(_message.Message):
    __slots__ = ("op", "count", "sum_seconds", "p50_seconds", "p90_seconds", "p99_seconds", "errors")
    OP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P90_SECONDS_FIELD_NUMBER: _ClassVar[int]
    P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    op: str
    count: int
    sum_seconds: float
    p50_seconds: float
    p90_seconds: float
    p99_seconds: float
    errors: int
    def __init__(self, op: _Optional[str] = ..., count: _Optional[int] = ..., sum_seconds: _Optional[float] = ..., p50_seconds: _Optional[float] = ..., p90_seconds: _Optional[float] = ..., p99_seconds: _Optional[float] = ..., errors: _Optional[int] = ...) -> None: ...

class ProcessUsage(_message.Message):
    __slots__ = ("cpu_user_seconds", "cpu_system_seconds", "voluntary_ctx_switches", "involuntary_ctx_switches", "processes")
    CPU_USER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CPU_SYSTEM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VOLUNTARY_CTX_SWITCHES_FIELD_NUMBER: _ClassVar[int]
    INVOLUNTARY_CTX_SWITCHES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    cpu_user_seconds: float
    cpu_system_seconds: float
    voluntary_ctx_switches: int
    involuntary_ctx_switches: int
    processes: int
    def __init__(self, cpu_user_seconds: _Optional[float] = ..., cpu_system_seconds: _Optional[float] = ..., voluntary_ctx_switches: _Optional[int] = ..., involuntary_ctx_switches: _Optional[int] = ..., processes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("node_id", "uptime_seconds", "engine", "latency", "process")
    class EngineEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    uptime_seconds: float
    engine: _containers.ScalarMap[str, int]
    latency: _containers.RepeatedCompositeFieldContainer[LatencySummary]
    process: ProcessUsage
    def __init__(self, node_id: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., engine: _Optional[_Mapping[str, int]] = ..., latency: _Optional[_Iterable[_Union[LatencySummary, _Mapping]]] = ..., process: _Optional[_Union[ProcessUsage, _Mapping]] = ...) -> None: ...

class NodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfoResponse(_message.Message):
    __slots__ = ("node_id", "data_address", "control_address", "capacity_bytes", "format_version", "device_uuid", "device_path", "device_size", "region_size", "num_regions", "max_block_size", "software_version", "uptime_seconds", "start_time_unix", "status", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_PATH_FIELD_NUMBER: _ClassVar[int]
    DEVICE_SIZE_FIELD_NUMBER: _ClassVar[int]
    REGION_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_REGIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    data_address: str
    control_address: str
    capacity_bytes: int
    format_version: int
    device_uuid: str
    device_path: str
    device_size: int
    region_size: int
    num_regions: int
    max_block_size: int
    software_version: str
    uptime_seconds: float
    start_time_unix: float
    status: ServingStatus
    labels: _containers.ScalarMap[str, str]
    def __init__(self, node_id: _Optional[str] = ..., data_address: _Optional[str] = ..., control_address: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., format_version: _Optional[int] = ..., device_uuid: _Optional[str] = ..., device_path: _Optional[str] = ..., device_size: _Optional[int] = ..., region_size: _Optional[int] = ..., num_regions: _Optional[int] = ..., max_block_size: _Optional[int] = ..., software_version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., start_time_unix: _Optional[float] = ..., status: _Optional[_Union[ServingStatus, str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    def __init__(self, timeout_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("drained", "inflight_remaining", "elapsed_seconds", "status", "message")
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_REMAINING_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    drained: bool
    inflight_remaining: int
    elapsed_seconds: float
    status: ServingStatus
    message: str
    def __init__(self, drained: bool = ..., inflight_remaining: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., status: _Optional[_Union[ServingStatus, str]] = ..., message: _Optional[str] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("status", "previous")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    status: ServingStatus
    previous: ServingStatus
    def __init__(self, status: _Optional[_Union[ServingStatus, str]] = ..., previous: _Optional[_Union[ServingStatus, str]] = ...) -> None: ...

class EvictAllRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EvictAllResponse(_message.Message):
    __slots__ = ("evicted_blocks",)
    EVICTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    evicted_blocks: int
    def __init__(self, evicted_blocks: _Optional[int] = ...) -> None: ...

class ClusterMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterNode(_message.Message):
    __slots__ = ("node_id", "address", "state", "capacity_bytes", "used_bytes", "hit_rate", "control_address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    state: ServingStatus
    capacity_bytes: int
    used_bytes: int
    hit_rate: float
    control_address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[ServingStatus, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., hit_rate: _Optional[float] = ..., control_address: _Optional[str] = ...) -> None: ...

class ClusterMapResponse(_message.Message):
    __slots__ = ("nodes", "source")
    NODES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[ClusterNode]
    source: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[ClusterNode, _Mapping]]] = ..., source: _Optional[str] = ...) -> None: ...
