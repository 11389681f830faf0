from moe_client.pb import experts_pb2 as _experts_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoadExpertsRequest(_message.Message):
    __slots__ = ("experts", "device", "lock_holder")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LOCK_HOLDER_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[_experts_pb2.LayerExperts]
    device: str
    lock_holder: str
    def __init__(self, experts: _Optional[_Iterable[_Union[_experts_pb2.LayerExperts, _Mapping]]] = ..., device: _Optional[str] = ..., lock_holder: _Optional[str] = ...) -> None: ...

class LoadExpertsResponse(_message.Message):
    __slots__ = ("placement_version", "load_seconds", "owned")
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    placement_version: int
    load_seconds: float
    owned: _containers.RepeatedCompositeFieldContainer[_experts_pb2.LayerExperts]
    def __init__(self, placement_version: _Optional[int] = ..., load_seconds: _Optional[float] = ..., owned: _Optional[_Iterable[_Union[_experts_pb2.LayerExperts, _Mapping]]] = ...) -> None: ...

class DropExpertsRequest(_message.Message):
    __slots__ = ("experts", "lock_holder", "drain_seconds")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    LOCK_HOLDER_FIELD_NUMBER: _ClassVar[int]
    DRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[_experts_pb2.LayerExperts]
    lock_holder: str
    drain_seconds: float
    def __init__(self, experts: _Optional[_Iterable[_Union[_experts_pb2.LayerExperts, _Mapping]]] = ..., lock_holder: _Optional[str] = ..., drain_seconds: _Optional[float] = ...) -> None: ...

class DropExpertsResponse(_message.Message):
    __slots__ = ("placement_version", "drain_seconds", "owned")
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    placement_version: int
    drain_seconds: float
    owned: _containers.RepeatedCompositeFieldContainer[_experts_pb2.LayerExperts]
    def __init__(self, placement_version: _Optional[int] = ..., drain_seconds: _Optional[float] = ..., owned: _Optional[_Iterable[_Union[_experts_pb2.LayerExperts, _Mapping]]] = ...) -> None: ...

class GetExpertLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertLoad(_message.Message):
    __slots__ = ("layer", "expert", "tokens")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    tokens: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class DeviceCapacity(_message.Message):
    __slots__ = ("device", "capacity_bytes", "used_bytes")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    device: str
    capacity_bytes: int
    used_bytes: int
    def __init__(self, device: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ...) -> None: ...

class GetExpertLoadResponse(_message.Message):
    __slots__ = ("server_name", "placement_version", "experts", "devices", "expert_bytes")
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    server_name: str
    placement_version: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertLoad]
    devices: _containers.RepeatedCompositeFieldContainer[DeviceCapacity]
    expert_bytes: int
    def __init__(self, server_name: _Optional[str] = ..., placement_version: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertLoad, _Mapping]]] = ..., devices: _Optional[_Iterable[_Union[DeviceCapacity, _Mapping]]] = ..., expert_bytes: _Optional[int] = ...) -> None: ...

class AcquireChangeLockRequest(_message.Message):
    __slots__ = ("holder", "ttl_seconds")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    holder: str
    ttl_seconds: float
    def __init__(self, holder: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...

class AcquireChangeLockResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseChangeLockRequest(_message.Message):
    __slots__ = ("holder",)
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    holder: str
    def __init__(self, holder: _Optional[str] = ...) -> None: ...

class ReleaseChangeLockResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
