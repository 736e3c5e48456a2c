from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class OpenRequest(_message.Message):
    __slots__ = ("session", "model_digest", "split", "codec", "repetition_penalty")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    session: str
    model_digest: str
    split: int
    codec: str
    repetition_penalty: float
    def __init__(self, session: _Optional[str] = ..., model_digest: _Optional[str] = ..., split: _Optional[int] = ..., codec: _Optional[str] = ..., repetition_penalty: _Optional[float] = ...) -> None: ...

class OpenReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HiddenStates(_message.Message):
    __slots__ = ("session", "pos0", "codec", "rows", "cols", "data", "scales", "tokens")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    POS0_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    session: str
    pos0: int
    codec: str
    rows: int
    cols: int
    data: bytes
    scales: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session: _Optional[str] = ..., pos0: _Optional[int] = ..., codec: _Optional[str] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class AppendReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("token", "cloud_ms", "layer_evals")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLOUD_MS_FIELD_NUMBER: _ClassVar[int]
    LAYER_EVALS_FIELD_NUMBER: _ClassVar[int]
    token: int
    cloud_ms: float
    layer_evals: int
    def __init__(self, token: _Optional[int] = ..., cloud_ms: _Optional[float] = ..., layer_evals: _Optional[int] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...
