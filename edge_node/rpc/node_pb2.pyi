from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceFacts(_message.Message):
    __slots__ = ("cores", "memory_total", "memory_available", "disk_free", "providers", "speed_gflops")
    CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    SPEED_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    cores: int
    memory_total: int
    memory_available: int
    disk_free: int
    providers: _containers.RepeatedScalarFieldContainer[str]
    speed_gflops: float
    def __init__(self, cores: _Optional[int] = ..., memory_total: _Optional[int] = ..., memory_available: _Optional[int] = ..., disk_free: _Optional[int] = ..., providers: _Optional[_Iterable[str]] = ..., speed_gflops: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "token", "facts", "advertise_host")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_HOST_FIELD_NUMBER: _ClassVar[int]
    name: str
    token: str
    facts: DeviceFacts
    advertise_host: str
    def __init__(self, name: _Optional[str] = ..., token: _Optional[str] = ..., facts: _Optional[_Union[DeviceFacts, _Mapping]] = ..., advertise_host: _Optional[str] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("node_id", "node_secret", "heartbeat_interval_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_SECRET_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    node_secret: str
    heartbeat_interval_s: float
    def __init__(self, node_id: _Optional[str] = ..., node_secret: _Optional[str] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("cpu_percent", "memory_available", "disk_free", "agent_rss")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_FIELD_NUMBER: _ClassVar[int]
    AGENT_RSS_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_available: int
    disk_free: int
    agent_rss: int
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_available: _Optional[int] = ..., disk_free: _Optional[int] = ..., agent_rss: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class AssignmentsRequest(_message.Message):
    __slots__ = ("known_version",)
    KNOWN_VERSION_FIELD_NUMBER: _ClassVar[int]
    known_version: int
    def __init__(self, known_version: _Optional[int] = ...) -> None: ...

class FileRef(_message.Message):
    __slots__ = ("path", "size", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("deployment_id", "rank", "world", "run_config_json", "master", "listen", "files")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    MASTER_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    rank: int
    world: int
    run_config_json: str
    master: str
    listen: str
    files: _containers.RepeatedCompositeFieldContainer[FileRef]
    def __init__(self, deployment_id: _Optional[str] = ..., rank: _Optional[int] = ..., world: _Optional[int] = ..., run_config_json: _Optional[str] = ..., master: _Optional[str] = ..., listen: _Optional[str] = ..., files: _Optional[_Iterable[_Union[FileRef, _Mapping]]] = ...) -> None: ...

class AssignmentSet(_message.Message):
    __slots__ = ("version", "assignments")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    def __init__(self, version: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("deployment_id", "rank", "status", "exit_code", "stderr_tail", "detail", "master", "listen")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STDERR_TAIL_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    MASTER_FIELD_NUMBER: _ClassVar[int]
    LISTEN_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    rank: int
    status: str
    exit_code: int
    stderr_tail: str
    detail: str
    master: str
    listen: str
    def __init__(self, deployment_id: _Optional[str] = ..., rank: _Optional[int] = ..., status: _Optional[str] = ..., exit_code: _Optional[int] = ..., stderr_tail: _Optional[str] = ..., detail: _Optional[str] = ..., master: _Optional[str] = ..., listen: _Optional[str] = ...) -> None: ...

class ReportReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchFileRequest(_message.Message):
    __slots__ = ("deployment_id", "path", "offset")
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    path: str
    offset: int
    def __init__(self, deployment_id: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
