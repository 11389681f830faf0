"""The one codec between arrays and `moe.v1.Tensor`: dtype + shape + raw row-major little-endian bytes.

numpy has no bfloat16, so bf16 travels and is held as raw uint16 words (the upper half of a
float32); `decode` widens it to float32 for callers that want numbers.
"""

from __future__ import annotations

import math

import numpy as np

from moe_client.pb import tensor_pb2

DType = tensor_pb2.DType
FLOAT32, BFLOAT16, FLOAT16 = tensor_pb2.FLOAT32, tensor_pb2.BFLOAT16, tensor_pb2.FLOAT16
FLOAT8_E4M3, INT32, INT64 = tensor_pb2.FLOAT8_E4M3, tensor_pb2.INT32, tensor_pb2.INT64

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


class WireError(ValueError):
    """A Tensor message that does not describe a valid tensor; the message names the field."""


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


def encode(array: np.ndarray, dtype: int | str | None = None) -> tensor_pb2.Tensor:
    """Array -> Tensor in wire dtype `dtype` (default: the array's own, float64 as float32).

    A uint16 array given with dtype BFLOAT16 is taken as raw bf16 words.
    """
    array = np.asarray(array)
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    if dtype is None:
        dtype = _default_dtype(array)
    if dtype == BFLOAT16:
        data = array.astype("<u2", copy=False) if array.dtype == np.uint16 else float32_to_bf16_bits(array)
    elif dtype in STORAGE and dtype != FLOAT8_E4M3:
        data = np.ascontiguousarray(array, dtype=STORAGE[dtype])
    else:
        raise WireError(f"cannot encode to dtype {dtype_name(dtype)} from numpy")
    return tensor_pb2.Tensor(dtype=dtype, shape=list(array.shape), data=data.tobytes())


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


def check(msg: tensor_pb2.Tensor, field: str, allowed: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Validate a Tensor message; returns its shape. Raises WireError naming `field` and the bad value."""
    if msg.dtype not in STORAGE:
        raise WireError(f"{field}: unknown dtype {msg.dtype}")
    if allowed is not None and msg.dtype not in allowed:
        raise WireError(
            f"{field}: dtype {dtype_name(msg.dtype)} not accepted here; expected {' or '.join(dtype_name(d) for d in allowed)}"
        )
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"{field}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise WireError(f"{field}: shape {list(shape)} has {count} elements, more than the limit {MAX_ELEMENTS}")
    expected = count * STORAGE[msg.dtype].itemsize
    if len(msg.data) != expected:
        raise WireError(
            f"{field}: shape {list(shape)} of {dtype_name(msg.dtype)} needs {expected} bytes, got {len(msg.data)}"
        )
    if msg.dtype == FLOAT8_E4M3:
        rows = count // shape[-1] if shape and shape[-1] else 0
        if len(msg.scales) != rows * 4:
            raise WireError(f"{field}: float8_e4m3 needs {rows} float32 scales ({rows * 4} bytes), got {len(msg.scales)}")
    return shape


def decode_raw(msg: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Validated Tensor -> read-only array over its bytes in storage dtype (bf16 as uint16), no copy."""
    shape = check(msg, field)
    return np.frombuffer(msg.data, dtype=STORAGE[msg.dtype]).reshape(shape)


def decode(msg: tensor_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Validated Tensor -> array with numeric values: bf16 widened to float32, fp8 dequantised."""
    raw = decode_raw(msg, field)
    if msg.dtype == BFLOAT16:
        return bf16_bits_to_float32(raw)
    if msg.dtype == FLOAT8_E4M3:
        scales = np.frombuffer(msg.scales, dtype="<f4")
        values = E4M3_TABLE[raw]
        return (values.reshape(-1, raw.shape[-1]) * scales[:, None]).reshape(raw.shape)
    return raw


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
