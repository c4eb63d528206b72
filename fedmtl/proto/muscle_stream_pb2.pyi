from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("client_id", "token", "round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    round: int
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Representation(_message.Message):
    __slots__ = ("step", "z")
    STEP_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    step: int
    z: Tensor
    def __init__(self, step: _Optional[int] = ..., z: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClientFrame(_message.Message):
    __slots__ = ("hello", "representation")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    REPRESENTATION_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    representation: Representation
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., representation: _Optional[_Union[Representation, _Mapping]] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("step", "steps")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    step: int
    steps: int
    def __init__(self, step: _Optional[int] = ..., steps: _Optional[int] = ...) -> None: ...

class Payload(_message.Message):
    __slots__ = ("step", "tensors", "skip", "reason", "next_step")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    tensors: _containers.MessageMap[str, Tensor]
    skip: bool
    reason: str
    next_step: int
    def __init__(self, step: _Optional[int] = ..., tensors: _Optional[_Mapping[str, Tensor]] = ..., skip: bool = ..., reason: _Optional[str] = ..., next_step: _Optional[int] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("welcome", "payload")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    payload: Payload
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., payload: _Optional[_Union[Payload, _Mapping]] = ...) -> None: ...
