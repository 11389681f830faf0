"""torch <-> `moe.v1.Tensor`, on top of the client's codec (the only place tensors become bytes)."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from moe_client import wire
from moe_client.pb import tensor_pb2

TORCH_DTYPES = {
    wire.FLOAT32: torch.float32,
    wire.BFLOAT16: torch.bfloat16,
    wire.FLOAT16: torch.float16,
    wire.INT32: torch.int32,
    wire.INT64: torch.int64,
}
WIRE_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}
_STORAGE_VIEW = {torch.bfloat16: torch.int16}  # numpy cannot hold bf16: move its raw words


def from_wire(msg: tensor_pb2.Tensor, field: str, allowed: tuple[int, ...] | None = None) -> torch.Tensor:
    """Validated Tensor -> torch tensor over the message's bytes (read-only, no copy; fp8 dequantised)."""
    wire.check(msg, field, allowed)
    if msg.dtype == wire.FLOAT8_E4M3:
        return torch.from_numpy(wire.decode(msg, field))
    raw = wire.decode_raw(msg, field)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: callers never write in place
        tensor = torch.from_numpy(raw)
    if msg.dtype == wire.BFLOAT16:
        tensor = tensor.view(torch.bfloat16)
    return tensor


def to_wire(tensor: torch.Tensor, dtype: int | None = None) -> tensor_pb2.Tensor:
    """torch tensor -> Tensor in wire dtype `dtype` (default: the tensor's own)."""
    dtype = WIRE_DTYPES[tensor.dtype] if dtype in (None, wire.DType.Value("DTYPE_UNSPECIFIED")) else dtype
    if dtype not in TORCH_DTYPES:
        raise wire.WireError(f"output dtype {wire.dtype_name(dtype)} is not supported")
    t = tensor.detach().to(device="cpu", dtype=TORCH_DTYPES[dtype]).contiguous()
    storage = t.view(_STORAGE_VIEW.get(t.dtype, t.dtype)).numpy()
    return tensor_pb2.Tensor(dtype=dtype, shape=list(t.shape), data=np.ascontiguousarray(storage).tobytes())
