from moe_client.pb import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REGION_KIND_UNSPECIFIED: _ClassVar[RegionKind]
    REGION_KIND_SHM: _ClassVar[RegionKind]
    REGION_KIND_CUDA: _ClassVar[RegionKind]
REGION_KIND_UNSPECIFIED: RegionKind
REGION_KIND_SHM: RegionKind
REGION_KIND_CUDA: RegionKind

class RunExpertsRequest(_message.Message):
    __slots__ = ("layer", "hidden", "expert_ids", "weights", "output_dtype", "request_id", "model_fingerprint", "shared_hidden", "shared_output", "shared_expert_ids", "shared_weights", "experts", "gpu_event", "shared_done", "done_index", "done_value")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SHARED_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SHARED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SHARED_EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    SHARED_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    GPU_EVENT_FIELD_NUMBER: _ClassVar[int]
    SHARED_DONE_FIELD_NUMBER: _ClassVar[int]
    DONE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DONE_VALUE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: _tensor_pb2.Tensor
    expert_ids: _tensor_pb2.Tensor
    weights: _tensor_pb2.Tensor
    output_dtype: _tensor_pb2.DType
    request_id: str
    model_fingerprint: str
    shared_hidden: SharedTensor
    shared_output: SharedTensor
    shared_expert_ids: SharedTensor
    shared_weights: SharedTensor
    experts: _containers.RepeatedScalarFieldContainer[int]
    gpu_event: bytes
    shared_done: SharedTensor
    done_index: int
    done_value: int
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., weights: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., output_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., request_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., shared_hidden: _Optional[_Union[SharedTensor, _Mapping]] = ..., shared_output: _Optional[_Union[SharedTensor, _Mapping]] = ..., shared_expert_ids: _Optional[_Union[SharedTensor, _Mapping]] = ..., shared_weights: _Optional[_Union[SharedTensor, _Mapping]] = ..., experts: _Optional[_Iterable[int]] = ..., gpu_event: _Optional[bytes] = ..., shared_done: _Optional[_Union[SharedTensor, _Mapping]] = ..., done_index: _Optional[int] = ..., done_value: _Optional[int] = ...) -> None: ...

class SharedTensor(_message.Message):
    __slots__ = ("dtype", "shape", "region", "offset")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    dtype: _tensor_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    region: SharedRegion
    offset: int
    def __init__(self, dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., region: _Optional[_Union[SharedRegion, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class SharedRegion(_message.Message):
    __slots__ = ("kind", "name", "size", "device_uuid", "cuda_handle", "cuda_offset", "ref_counter", "ref_counter_offset", "key")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    CUDA_HANDLE_FIELD_NUMBER: _ClassVar[int]
    CUDA_OFFSET_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    kind: RegionKind
    name: str
    size: int
    device_uuid: str
    cuda_handle: bytes
    cuda_offset: int
    ref_counter: bytes
    ref_counter_offset: int
    key: bytes
    def __init__(self, kind: _Optional[_Union[RegionKind, str]] = ..., name: _Optional[str] = ..., size: _Optional[int] = ..., device_uuid: _Optional[str] = ..., cuda_handle: _Optional[bytes] = ..., cuda_offset: _Optional[int] = ..., ref_counter: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., key: _Optional[bytes] = ...) -> None: ...

class RunExpertsResponse(_message.Message):
    __slots__ = ("output", "compute_seconds", "placement_version", "gpu_event")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    GPU_EVENT_FIELD_NUMBER: _ClassVar[int]
    output: _tensor_pb2.Tensor
    compute_seconds: float
    placement_version: int
    gpu_event: bytes
    def __init__(self, output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., placement_version: _Optional[int] = ..., gpu_event: _Optional[bytes] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., experts: _Optional[_Iterable[int]] = ...) -> None: ...

class ExpertPlacement(_message.Message):
    __slots__ = ("layer", "expert", "device")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    device: str
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_fingerprint", "model_type", "hidden_size", "num_experts", "moe_layers", "owned", "devices", "compute_dtype", "placement", "server_version", "server_name", "host_id", "shared_kinds", "gpu_uuids", "placement_version", "local_address", "tcp_channel_port", "compute_gpu_uuids", "routed_calls", "done_signals")
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    OWNED_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_KINDS_FIELD_NUMBER: _ClassVar[int]
    GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TCP_CHANNEL_PORT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_GPU_UUIDS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_CALLS_FIELD_NUMBER: _ClassVar[int]
    DONE_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    model_fingerprint: str
    model_type: str
    hidden_size: int
    num_experts: int
    moe_layers: _containers.RepeatedScalarFieldContainer[int]
    owned: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    devices: _containers.RepeatedScalarFieldContainer[str]
    compute_dtype: _tensor_pb2.DType
    placement: _containers.RepeatedCompositeFieldContainer[ExpertPlacement]
    server_version: str
    server_name: str
    host_id: str
    shared_kinds: _containers.RepeatedScalarFieldContainer[RegionKind]
    gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    placement_version: int
    local_address: str
    tcp_channel_port: int
    compute_gpu_uuids: _containers.RepeatedScalarFieldContainer[str]
    routed_calls: bool
    done_signals: bool
    def __init__(self, model_fingerprint: _Optional[str] = ..., model_type: _Optional[str] = ..., hidden_size: _Optional[int] = ..., num_experts: _Optional[int] = ..., moe_layers: _Optional[_Iterable[int]] = ..., owned: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., devices: _Optional[_Iterable[str]] = ..., compute_dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., placement: _Optional[_Iterable[_Union[ExpertPlacement, _Mapping]]] = ..., server_version: _Optional[str] = ..., server_name: _Optional[str] = ..., host_id: _Optional[str] = ..., shared_kinds: _Optional[_Iterable[_Union[RegionKind, str]]] = ..., gpu_uuids: _Optional[_Iterable[str]] = ..., placement_version: _Optional[int] = ..., local_address: _Optional[str] = ..., tcp_channel_port: _Optional[int] = ..., compute_gpu_uuids: _Optional[_Iterable[str]] = ..., routed_calls: _Optional[bool] = ..., done_signals: _Optional[bool] = ...) -> None: ...
