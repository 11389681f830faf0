"""The one codec between arrays and `moe.v1.Tensor`: dtype + shape + raw row-major little-endian bytes.

numpy has no bfloat16, so bf16 travels and is held as raw uint16 words (the upper half of a
float32); `decode` widens it to float32 for callers that want numbers. float8_e4m3 travels as one
byte per element with a float32 scale per row (per token), so every row uses the format's range.

`WireTensor` is the Tensor message's fields around borrowed buffers: `moe_client.zerocopy` writes
and reads it as protobuf wire format without copying the tensor bytes; `to_message` makes a real
protobuf message of it for code that wants one.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from moe_client.pb import tensor_pb2

DType = tensor_pb2.DType  # the enum; below, short names of its values (wire.FLOAT32 is DTYPE_FLOAT32)
FLOAT32, BFLOAT16, FLOAT16 = tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_BFLOAT16, tensor_pb2.DTYPE_FLOAT16
FLOAT8_E4M3, INT32, INT64 = tensor_pb2.DTYPE_FLOAT8_E4M3, tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_INT64

# Storage dtype of each wire dtype, as numpy holds it.
STORAGE = {
    FLOAT32: np.dtype("<f4"),
    BFLOAT16: np.dtype("<u2"),
    FLOAT16: np.dtype("<f2"),
    FLOAT8_E4M3: np.dtype("u1"),
    INT32: np.dtype("<i4"),
    INT64: np.dtype("<i8"),
}
NAMES = {"float32": FLOAT32, "bfloat16": BFLOAT16, "float16": FLOAT16, "float8_e4m3": FLOAT8_E4M3,
         "int32": INT32, "int64": INT64}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8_e4m3"}
FLOAT_DTYPES = (FLOAT32, BFLOAT16, FLOAT16, FLOAT8_E4M3)
MAX_ELEMENTS = 1 << 34  # refuse shapes beyond this before any allocation
MAX_DIMS = 32  # numpy 1.x's limit (2.x allows 64); our tensors have up to 3


class WireError(ValueError):
    """A Tensor message that does not describe a valid tensor; the message names the field."""


class WireTensor(NamedTuple):
    """A Tensor message's fields, with `data` and `scales` borrowed (bytes or a byte memoryview)."""

    dtype: int = 0
    shape: tuple[int, ...] = ()
    data: bytes | memoryview = b""
    scales: bytes | memoryview = b""


def byte_view(buffer) -> memoryview:
    """A flat unsigned-byte memoryview over a C-contiguous buffer (numpy array, bytes, ...), no copy."""
    view = memoryview(buffer)
    if view.format == "B" and view.ndim == 1:
        return view
    return view.cast("B") if view.nbytes else memoryview(b"")  # cast refuses zeros in the shape


def to_message(tensor: WireTensor) -> tensor_pb2.Tensor:
    """A protobuf Tensor with the same fields (copies the bytes; for callers that need a real message)."""
    return tensor_pb2.Tensor(dtype=tensor.dtype, shape=list(tensor.shape), data=bytes(tensor.data),
                             scales=bytes(tensor.scales))


def dtype_from_name(name: str) -> int:
    """'float32' / 'bf16' / ... -> DType enum value."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in NAMES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(NAMES)}")
    return NAMES[key]


def dtype_name(dtype: int) -> str:
    """DType enum value -> 'float32', 'bfloat16', ..."""
    for name, value in NAMES.items():
        if value == dtype:
            return name
    return DType.Name(dtype) if dtype in DType.values() else f"<unknown dtype {dtype}>"


def float32_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) and return the raw uint16 words."""
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    words = (rounded >> 16).astype("<u2")
    nan = np.isnan(array)
    if nan.any():
        words[nan] = 0x7FC0
    return words


def bf16_bits_to_float32(words: np.ndarray) -> np.ndarray:
    """Raw bfloat16 words -> float32 values (exact)."""
    return (words.astype("<u4") << 16).view("<f4")


def encode_view(array: np.ndarray, dtype: int | str | None = None) -> WireTensor:
    """Array -> WireTensor in wire dtype `dtype` (default: the array's own, float64 as float32).

    No copy when the array is already contiguous little-endian storage of `dtype`. A uint16 array
    given with dtype BFLOAT16 is taken as raw bf16 words.
    """
    array = np.asarray(array)
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    if dtype is None:
        dtype = _default_dtype(array)
    scales = b""
    if dtype == BFLOAT16:
        data = np.ascontiguousarray(array, "<u2") if array.dtype == np.uint16 else float32_to_bf16_bits(array)
    elif dtype == FLOAT8_E4M3:
        data, row_scales = quantize_e4m3(array)
        scales = byte_view(row_scales)
    elif dtype in STORAGE:
        data = np.ascontiguousarray(array, dtype=STORAGE[dtype])
    else:
        raise WireError(f"cannot encode to dtype {dtype_name(dtype)} from numpy")
    return WireTensor(dtype, tuple(array.shape), byte_view(data), scales)


def encode(array: np.ndarray, dtype: int | str | None = None) -> tensor_pb2.Tensor:
    """Array -> protobuf Tensor in wire dtype `dtype` (see `encode_view`)."""
    return to_message(encode_view(array, dtype))


def _default_dtype(array: np.ndarray) -> int:
    kind = array.dtype
    if kind == np.float16:
        return FLOAT16
    if kind in (np.float32, np.float64):
        return FLOAT32
    if kind == np.int32:
        return INT32
    if np.issubdtype(kind, np.integer):
        return INT64
    raise WireError(f"cannot encode numpy dtype {kind}")


def check(msg: tensor_pb2.Tensor | WireTensor, field: str, allowed: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Validate a Tensor message; returns its shape. Raises WireError naming `field` and the bad value."""
    storage = STORAGE.get(msg.dtype)
    if storage is None:
        raise WireError(f"{field}: unknown dtype {msg.dtype}")
    if allowed is not None and msg.dtype not in allowed:
        expected = " or ".join(dtype_name(d) for d in allowed)
        raise WireError(f"{field}: dtype {dtype_name(msg.dtype)} not accepted here; expected {expected}")
    shape = tuple(msg.shape)  # ints already, from protobuf and from zerocopy alike
    if shape and min(shape) < 0:
        raise WireError(f"{field}: negative dimension in shape {list(shape)}")
    if len(shape) > MAX_DIMS:
        raise WireError(f"{field}: shape {list(shape)} has {len(shape)} dimensions, more than the limit {MAX_DIMS}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise WireError(f"{field}: shape {list(shape)} has {count} elements, more than the limit {MAX_ELEMENTS}")
    # With a zero dimension there are no elements, but numpy and torch still multiply the others and
    # refuse a product past int64 ("array is too big"): the same limit holds for the non-zero dimensions.
    if count == 0 and math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise WireError(f"{field}: shape {list(shape)} has dimensions past the limit of {MAX_ELEMENTS} elements "
                        "(beside a zero dimension)")
    expected = count * storage.itemsize
    if len(msg.data) != expected:
        raise WireError(
            f"{field}: shape {list(shape)} of {dtype_name(msg.dtype)} needs {expected} bytes, got {len(msg.data)}"
        )
    if msg.dtype == FLOAT8_E4M3:
        if not shape:
            raise WireError(f"{field}: float8_e4m3 needs at least one dimension (its scales are per row)")
        rows = count // shape[-1] if shape[-1] else 0
        if len(msg.scales) != rows * 4:
            raise WireError(f"{field}: float8_e4m3 needs {rows} float32 scales ({rows * 4} bytes), "
                            f"got {len(msg.scales)}")
    return shape


def decode_raw(msg: tensor_pb2.Tensor | WireTensor, field: str = "tensor") -> np.ndarray:
    """Validated Tensor -> read-only array over its bytes in storage dtype (bf16 as uint16), no copy."""
    shape = check(msg, field)
    return np.frombuffer(msg.data, dtype=STORAGE[msg.dtype]).reshape(shape)


def decode(msg: tensor_pb2.Tensor | WireTensor, field: str = "tensor") -> np.ndarray:
    """Validated Tensor -> array with numeric values: bf16 widened to float32, fp8 dequantised."""
    raw = decode_raw(msg, field)
    if msg.dtype == BFLOAT16:
        return bf16_bits_to_float32(raw)
    if msg.dtype == FLOAT8_E4M3:
        if raw.size == 0:
            return np.zeros(raw.shape, np.float32)
        scales = np.frombuffer(msg.scales, dtype="<f4")
        values = E4M3_TABLE[raw]
        return (values.reshape(-1, raw.shape[-1]) * scales[:, None]).reshape(raw.shape)
    return raw


def quantize_e4m3(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float array [..., N] -> (e4m3 codes uint8 [..., N], float32 scale per row), like torch's cast.

    scale = row amax / 448 (1 for an all-zero row); codes round value / scale to nearest, ties to
    even, as `tensor.to(torch.float8_e4m3fn)` does. Values must be finite.
    """
    x = np.asarray(array, dtype=np.float32)
    if x.ndim == 0:
        raise WireError("float8_e4m3 needs at least one dimension (scales are per row)")
    if x.shape[-1] == 0:  # no elements, so no rows to scale (as `check` counts them)
        return np.zeros(x.shape, np.uint8), np.zeros(0, "<f4")
    rows = x.reshape(-1, x.shape[-1])
    amax = np.abs(rows).max(axis=1)
    scales = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype("<f4")
    q = np.clip(rows / scales[:, None], -E4M3_MAX, E4M3_MAX)
    mag = np.abs(q)
    # Codes 0..126 are the non-negative finite values in increasing order: a code is its grid index.
    hi = np.clip(np.searchsorted(_E4M3_GRID, mag), 1, len(_E4M3_GRID) - 1)
    up, down = _E4M3_GRID[hi] - mag, mag - _E4M3_GRID[hi - 1]
    codes = np.where((up < down) | ((up == down) & (hi % 2 == 0)), hi, hi - 1).astype(np.uint8)
    codes |= np.signbit(q).astype(np.uint8) << 7
    return codes.reshape(x.shape), scales


def _e4m3_table() -> np.ndarray:
    # float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, 0x7F/0xFF are NaN.
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = sign * value
    value[(codes & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


E4M3_TABLE = _e4m3_table()
E4M3_MAX = 448.0
_E4M3_GRID = E4M3_TABLE[:0x7F]
