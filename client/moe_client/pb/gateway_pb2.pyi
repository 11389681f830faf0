from moe_client.pb import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardRequest(_message.Message):
    __slots__ = ("hidden", "output_dtype", "request_id")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    hidden: _tensor_pb2.Tensor
    output_dtype: _tensor_pb2.DType
    request_id: str
    def __init__(self, hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., output_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("hidden", "total_seconds", "expert_seconds")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    hidden: _tensor_pb2.Tensor
    total_seconds: float
    expert_seconds: float
    def __init__(self, hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., total_seconds: _Optional[float] = ..., expert_seconds: _Optional[float] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertServerInfo(_message.Message):
    __slots__ = ("address", "model_fingerprint", "devices", "owned")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    address: str
    model_fingerprint: str
    devices: _containers.RepeatedScalarFieldContainer[str]
    owned: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, address: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., devices: _Optional[_Iterable[str]] = ..., owned: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_type", "model_fingerprint", "hidden_size", "num_layers", "moe_layers", "num_experts", "top_k", "dense_dtype", "servers")
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DENSE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    model_type: str
    model_fingerprint: str
    hidden_size: int
    num_layers: int
    moe_layers: _containers.RepeatedScalarFieldContainer[int]
    num_experts: int
    top_k: int
    dense_dtype: str
    servers: _containers.RepeatedCompositeFieldContainer[ExpertServerInfo]
    def __init__(self, model_type: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., moe_layers: _Optional[_Iterable[int]] = ..., num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., dense_dtype: _Optional[str] = ..., servers: _Optional[_Iterable[_Union[ExpertServerInfo, _Mapping]]] = ...) -> None: ...
