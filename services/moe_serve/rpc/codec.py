"""torch <-> `moe.v1.Tensor`, on top of the client's codec (the only place tensors become bytes).

Both directions borrow memory rather than copy it: `to_wire` hands out a view of the tensor's own
bytes when it already is contiguous CPU storage of the wire dtype, and `from_wire` returns a
read-only tensor over the received message's bytes. fp8 (e4m3) travels with a float32 scale per
row, made and undone here with torch's own float8 cast.
"""

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
_STORAGE_VIEW = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}  # numpy lacks these
_UNSPECIFIED = wire.DType.Value("DTYPE_UNSPECIFIED")


_warned = False


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    global _warned
    if _warned or array.flags.writeable:  # a writable array (a frame read into our own memory) draws no warning
        return torch.from_numpy(array)
    # torch warns once per process that the array is read-only (callers never write in place);
    # silence that one warning without paying for catch_warnings on every call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    _warned = True
    return tensor


def from_wire(msg: tensor_pb2.Tensor | wire.WireTensor, field: str,
              allowed: tuple[int, ...] | None = None) -> torch.Tensor:
    """Validated Tensor -> torch tensor over the message's bytes (read-only, no copy; fp8 dequantised to fp32)."""
    shape = wire.check(msg, field, allowed)
    if msg.dtype == wire.FLOAT8_E4M3:
        if not len(msg.data):
            return torch.empty(shape)
        codes = _from_numpy(np.frombuffer(msg.data, np.uint8)).view(torch.float8_e4m3fn).reshape(-1, shape[-1])
        scales = _from_numpy(np.frombuffer(msg.scales, "<f4"))
        return (codes.float() * scales[:, None]).reshape(shape)
    # through numpy: half the cost of torch.frombuffer + reshape on 1-token messages
    array = np.frombuffer(msg.data, dtype=wire.STORAGE[msg.dtype]).reshape(shape)
    tensor = _from_numpy(array)
    return tensor.view(torch.bfloat16) if msg.dtype == wire.BFLOAT16 else tensor


def quantize_e4m3(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] -> (float8_e4m3fn codes [..., N], float32 scales [rows]): scale = row amax / 448."""
    if tensor.dim() == 0:
        raise wire.WireError("float8_e4m3 needs at least one dimension (scales are per row)")
    if tensor.shape[-1] == 0:
        return torch.empty(tensor.shape, dtype=torch.float8_e4m3fn), torch.empty(0)
    rows = tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1, tensor.shape[-1])
    amax = rows.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / wire.E4M3_MAX, torch.ones_like(amax))
    codes = (rows / scales[:, None]).clamp_(-wire.E4M3_MAX, wire.E4M3_MAX).to(torch.float8_e4m3fn)
    return codes.reshape(tensor.shape), scales


def bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a flat byte view of its own memory (writable: replies land there)."""
    return wire.byte_view(t.view(_STORAGE_VIEW.get(t.dtype, t.dtype)).numpy())


def to_wire(tensor: torch.Tensor, dtype: int | None = None) -> wire.WireTensor:
    """torch tensor -> WireTensor in wire dtype `dtype` (default: the tensor's own); no copy when it can be."""
    dtype = WIRE_DTYPES[tensor.dtype] if dtype in (None, _UNSPECIFIED) else dtype
    shape = tuple(tensor.shape)
    if dtype == wire.FLOAT8_E4M3:
        codes, scales = quantize_e4m3(tensor)
        return wire.WireTensor(dtype, shape, bytes_of(codes.contiguous()), bytes_of(scales))
    target = TORCH_DTYPES.get(dtype)
    if target is None:
        raise wire.WireError(f"output dtype {wire.dtype_name(dtype)} is not supported")
    t = tensor.detach()
    if t.dtype != target or t.device.type != "cpu" or not t.is_contiguous():
        t = t.to(device="cpu", dtype=target).contiguous()
    return wire.WireTensor(dtype, shape, bytes_of(t))


def to_wire_owned(tensor: torch.Tensor, dtype: int | None = None) -> wire.WireTensor:
    """As `to_wire`, but the bytes never borrow `tensor`'s memory: for a tensor in a buffer that is
    reused (the GPU bank's pinned output), encoded before that buffer is written again."""
    resolved = WIRE_DTYPES[tensor.dtype] if dtype in (None, _UNSPECIFIED) else dtype
    if (resolved != wire.FLOAT8_E4M3 and TORCH_DTYPES.get(resolved) == tensor.dtype
            and tensor.device.type == "cpu" and tensor.is_contiguous()):
        tensor = tensor.detach().clone()  # to_wire would hand out a view of these very bytes
    return to_wire(tensor, dtype)


def to_message(tensor: torch.Tensor, dtype: int | None = None) -> tensor_pb2.Tensor:
    """torch tensor -> protobuf Tensor (copies; for code that builds ordinary protobuf messages)."""
    return wire.to_message(to_wire(tensor, dtype))
