"""Tensor-carrying messages written to and read from protobuf wire format by hand, around tensor bytes.

A protobuf message is a sequence of (tag, value) fields, a length-delimited field being a varint
length and then its bytes. So a message whose bulk is `bytes` fields can be written as a few small
headers around the tensors' own buffers (one join, the only copy), and read by slicing memoryviews
out of the received buffer (no copy), where upb copies each tensor on construct, serialize, parse
and field access. The bytes are standard protobuf: any protobuf client can talk to a server using
these types, and `SerializeToString` equals upb's byte for byte (a test checks it).

Message types are built from the generated descriptors, so they follow the .proto; a field kind
this module does not handle makes the import fail rather than drop data.
"""

from __future__ import annotations

import keyword
import struct
from collections.abc import Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from moe_client.pb import experts_pb2, gateway_pb2, tensor_pb2
from moe_client.wire import WireError, WireTensor

_F = FieldDescriptor
_VARINT = {_F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_ENUM, _F.TYPE_BOOL}
_SIGNED = {_F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_ENUM}
_32BIT = {_F.TYPE_INT32, _F.TYPE_UINT32, _F.TYPE_ENUM}
_DOUBLE = struct.Struct("<d")
_ENCODED_VARINTS = [bytes([n]) for n in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _ENCODED_VARINTS[value]
    value &= (1 << 64) - 1  # negative ints travel as 10-byte two's complement
    out = bytearray()
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 128:
            return result, pos
        shift += 7
        if shift >= 70:
            break
    raise WireError("malformed protobuf: truncated or overlong varint")


def _read_tag(buf, pos: int, end: int) -> tuple[int, int]:
    """A field's key: a varint of at most 5 bytes whose value fits 32 bits, or protobuf refuses the message
    (upb reads tags as uint32; a longer or larger one is malformed, even when it encodes a known key)."""
    key, after = _read_varint(buf, pos, end)
    if after - pos > 5 or key > 0xFFFFFFFF:
        raise WireError("malformed protobuf: a field key over 32 bits or 5 bytes")
    return key, after


_MAX_GROUP_DEPTH = 100  # protobuf's recursion limit


def _skip_group(buf, pos: int, end: int, number: int, message: str) -> int:
    """Skip a group's fields up to its end-group tag (number `number`); the position after it."""
    open_groups = [number]
    while pos < end:
        key, pos = _read_tag(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireError(f"malformed protobuf in {message}: field number 0")
        if wire_type == 4:
            if field != open_groups.pop():
                raise WireError(f"malformed protobuf in {message}: end of group {field} inside another group")
            if not open_groups:
                return pos
        elif wire_type == 3:
            open_groups.append(field)
            if len(open_groups) > _MAX_GROUP_DEPTH:
                raise WireError(f"malformed protobuf in {message}: groups nested deeper than {_MAX_GROUP_DEPTH}")
        elif wire_type == 0:
            _, pos = _read_varint(buf, pos, end)
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos, end)
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise WireError(f"malformed protobuf in {message}: wire type {wire_type}, field {field}")
        if pos > end:
            break
    raise WireError(f"malformed protobuf in {message}: group {number} runs past the end")


def _as_int(value: int, kind: int) -> int:
    """A decoded varint as protobuf reads it for the field's type (truncation, sign)."""
    if kind == _F.TYPE_BOOL:
        return bool(value)
    if kind in _32BIT:
        value &= 0xFFFFFFFF
        return value - (1 << 32) if kind in _SIGNED and value >= 1 << 31 else value
    return value - (1 << 64) if kind in _SIGNED and value >= 1 << 63 else value


class _Field:
    __slots__ = ("key", "kind", "message", "name", "number", "repeated", "wire_type")

    def __init__(self, field: FieldDescriptor, message: MessageType | None):
        self.name, self.number, self.kind = field.name, field.number, field.type
        self.repeated = field.is_repeated
        self.message = message
        if field.has_presence and message is None:
            raise TypeError(f"{field.full_name}: explicit-presence scalars are not supported by zerocopy")
        if self.repeated and (message is not None or field.type not in _VARINT or not field.is_packed):
            raise TypeError(f"{field.full_name}: only packed repeated integers are supported by zerocopy")
        if field.type in _VARINT:
            self.wire_type = 2 if self.repeated else 0  # proto3 packs repeated scalars
        elif field.type == _F.TYPE_DOUBLE:
            self.wire_type = 1
        elif field.type in (_F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE):
            self.wire_type = 2
        else:
            raise TypeError(f"{field.full_name}: field type {field.type} is not supported by zerocopy")
        self.key = _varint(self.number << 3 | self.wire_type)

    def default(self):
        if self.repeated:
            return ()
        if self.message is not None:
            return self.message.empty
        return {_F.TYPE_STRING: "", _F.TYPE_BYTES: b"", _F.TYPE_DOUBLE: 0.0, _F.TYPE_BOOL: False}.get(self.kind, 0)


class MessageType:
    """One message of the .proto: builds instances, writes them (`serialize`) and reads them (`parse`)."""

    def __init__(self, descriptor: Descriptor, factory: Callable | None = None,
                 nested: dict[str, MessageType] | None = None, memo: int = 0):
        """`memo` > 0: as a field of another message, parsed once per distinct bytes (the last `memo` kept) and
        the same instance handed out again: for small messages that repeat call after call and hold no
        tensor bytes (a SharedTensor naming an arena), which their readers must not change."""
        nested = nested or {}
        self.descriptor = descriptor
        self.memo = memo
        self._memo: dict[bytes, object] = {}
        self.fields = [_Field(f, nested.get(f.message_type.full_name) if f.message_type else None)
                       for f in sorted(descriptor.fields, key=lambda f: f.number)]
        missing = [f.message_type.full_name for f in descriptor.fields if f.message_type
                   and f.message_type.full_name not in nested]
        if missing:
            raise TypeError(f"{descriptor.full_name}: no zerocopy type given for {missing}")
        self.by_number = {f.number: f for f in self.fields}
        self._defaults = {f.name: f.default() for f in self.fields}
        self._nested_or_repeated = [f for f in self.fields if f.message is not None or f.repeated]
        self._write = _compile_writer(self)
        self._parse_into = _compile_reader(self)
        self.factory = factory or _view_class(descriptor.name, self)
        self.empty = self.factory(**self._defaults)

    def __call__(self, **values):
        """A new message; scalars not given take their protobuf defaults, message fields stay unset (None)."""
        return self.factory(**values)

    def chunks(self, message) -> tuple[list, int]:
        """The message's wire format as a list of bytes-like pieces (tensor buffers not copied), and its size."""
        out: list = []
        return out, self._write(message, out)

    def serialize(self, message) -> bytes:
        """Protobuf wire format of `message` (one copy of the tensor bytes, into the result)."""
        pieces, _ = self.chunks(message)
        return b"".join(pieces)

    def parse(self, data: bytes | memoryview):
        """Read wire format; bytes fields come back as memoryviews into `data` (no copy)."""
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        return self._build(self._parse_into({}, view, 0, len(view)))

    def _build(self, values: dict):
        # Scalars left out take the factory's defaults; unset message fields read as empty messages.
        for f in self._nested_or_repeated:
            if f.message is not None:
                sub = values.get(f.name)
                if sub is None:
                    values[f.name] = f.message.empty
                elif f.message.memo:  # the field's occurrences as bytes (several merge, as their concatenation)
                    values[f.name] = f.message._remembered(sub[0] if len(sub) == 1 else b"".join(sub))
                else:
                    values[f.name] = f.message._build(sub)
            elif f.name in values:
                values[f.name] = tuple(values[f.name])
        return self.factory(**values)

    def _remembered(self, data: bytes):
        message = self._memo.get(data)
        if message is None:
            message = self.parse(data)  # its bytes fields are views into `data`, kept alive by the memo
            if len(self._memo) >= self.memo:
                self._memo.clear()
            self._memo[data] = message
        return message

    def _parse_one(self, values: dict, key: int, buf: memoryview, pos: int, end: int) -> int:
        """Read one field whose key is already read; any encoding protobuf accepts. Returns the new position."""
        number, wire_type = key >> 3, key & 7
        if number == 0:  # protobuf refuses field number 0
            raise WireError(f"malformed protobuf in {self.descriptor.name}: field number 0")
        if wire_type == 3:  # a group (proto2's): skipped as an unknown field, as protobuf does
            return _skip_group(buf, pos, end, number, self.descriptor.name)
        if wire_type == 0 or wire_type == 2:
            if pos >= end:
                raise WireError(f"malformed protobuf in {self.descriptor.name}: field {number} runs past the end")
            value = buf[pos]
            pos += 1
            if value >= 128:
                value, pos = _read_varint(buf, pos - 1, end)
            if wire_type == 2:
                start, pos = pos, pos + value
        elif wire_type == 1 or wire_type == 5:
            start, pos = pos, pos + (8 if wire_type == 1 else 4)
        else:
            raise WireError(f"malformed protobuf in {self.descriptor.name}: wire type {wire_type}, field {number}")
        if pos > end:
            raise WireError(f"malformed protobuf in {self.descriptor.name}: field {number} runs past the end")
        f = self.by_number.get(number)
        if f is None:
            return pos  # unknown field: skipped, as protobuf does
        if f.repeated:
            items = values.setdefault(f.name, [])
            if wire_type == 2:  # packed
                p = start
                while p < pos:
                    item, p = _read_varint(buf, p, pos)
                    items.append(_as_int(item, f.kind))
            elif wire_type == 0:  # unpacked, as older writers send
                items.append(_as_int(value, f.kind))
        elif wire_type != f.wire_type:
            pass  # mismatched wire type: protobuf keeps it as an unknown field
        elif f.message is not None and f.message.memo:
            values.setdefault(f.name, []).append(bytes(buf[start:pos]))
        elif f.message is not None:  # repeated occurrences of a message field merge
            f.message._parse_into(values.setdefault(f.name, {}), buf, start, pos)
        elif wire_type == 0:
            values[f.name] = _as_int(value, f.kind)
        elif wire_type == 1:
            values[f.name] = _DOUBLE.unpack_from(buf, start)[0]
        elif f.kind == _F.TYPE_STRING:
            values[f.name] = _utf8(buf[start:pos], self.descriptor.name, f.name)
        else:
            values[f.name] = buf[start:pos]
        return pos

    def FromString(self, data: bytes):
        """`parse`, under the name grpc stubs and protobuf classes use."""
        return self.parse(data)


class _View:
    """A plain message instance: attributes named as the .proto fields; `SerializeToString` as protobuf's."""

    __slots__ = ()
    _type: MessageType

    def SerializeToString(self) -> bytes:
        """Wire format, as protobuf's method of the same name."""
        return self._type.serialize(self)

    def ByteSize(self) -> int:
        """Size of the wire format, as protobuf's method of the same name (no bytes copied)."""
        return self._type.chunks(self)[1]

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self._type.fields)
        return f"{type(self).__name__}({fields})"


def _view_class(name: str, message_type: MessageType) -> type:
    # A generated __init__ with keyword defaults, as dataclasses make them: unknown names are a TypeError.
    fields = message_type.fields
    params = ", ".join(f"{f.name}=_d{i}" for i, f in enumerate(fields))
    body = "".join(f"    self.{f.name} = {f.name}\n" for f in fields) or "    pass\n"
    namespace = {f"_d{i}": (None if f.message else f.default()) for i, f in enumerate(fields)}
    exec(f"def __init__(self, *, {params}):\n{body}", namespace)  # code built from the descriptor alone
    return type(name, (_View,), {"__slots__": tuple(f.name for f in fields), "__init__": namespace["__init__"],
                                 "_type": message_type})


def _compile_writer(message_type: MessageType) -> Callable[[object, list], int]:
    """Straight-line writer for one message type: appends its pieces to `out`, returns their total size.

    Generated from the descriptor (as dataclasses generate __init__): a generic loop over fields
    cost several times upb's time on small messages, and RunExperts at one token is a small message.
    """
    lines = ["def write(message, out):", "    size = 0"]
    namespace: dict = {"_varint": _varint, "_pack": _DOUBLE.pack, "_ZERO8": bytes(8)}
    for i, f in enumerate(message_type.fields):
        namespace[f"K{i}"] = f.key
        get = f"message.{f.name}" if not keyword.iskeyword(f.name) else f"getattr(message, {f.name!r})"
        lines.append(f"    v = {get}")
        if f.message is not None:
            namespace[f"W{i}"] = f.message._write
            lines += ["    if v is not None:", "        body = []", f"        n = W{i}(v, body)",
                      f"        h = K{i} + _varint(n)", "        out.append(h)", "        out.extend(body)",
                      "        size += len(h) + n"]
        elif f.repeated:
            namespace["_packed"] = _packed
            lines += ["    if len(v):", "        packed = _packed(v)",
                      f"        p = K{i} + _varint(len(packed)) + packed", "        out.append(p)",
                      "        size += len(p)"]
        elif f.wire_type == 0:
            lines += ["    if v:", f"        p = K{i} + _varint(int(v))", "        out.append(p)",
                      "        size += len(p)"]
        elif f.wire_type == 1:  # proto3 omits +0.0 but not -0.0: compare the bits
            lines += ["    p = _pack(v)", "    if p != _ZERO8:", f"        p = K{i} + p", "        out.append(p)",
                      "        size += len(p)"]
        else:
            encode = ".encode()" if f.kind == _F.TYPE_STRING else ""
            lines += [f"    d = v{encode}", "    n = len(d)", "    if n:", f"        h = K{i} + _varint(n)",
                      "        out.append(h)", "        out.append(d)", "        size += len(h) + n"]
    lines.append("    return size")
    exec("\n".join(lines), namespace)  # code built from the descriptor alone, no outside input
    return namespace["write"]


def _packed(values) -> bytes:
    """A packed repeated varint field's bytes; values in [0, 128) (expert numbers, bools) are one byte each."""
    if isinstance(values, (list, tuple)):  # not an array: bytes() of one would copy its memory, not its values
        try:
            packed = bytes(values)
            if packed.isascii():
                return packed
        except (TypeError, ValueError):  # a value outside [0, 256), or not an int
            pass
    return b"".join([_varint(int(x)) for x in values])


def _utf8(data: memoryview, message: str, field: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as err:
        raise WireError(f"malformed protobuf: field {message}.{field} is not UTF-8") from err


def _compile_reader(message_type: MessageType) -> Callable[[dict, memoryview, int, int], dict]:
    """Reader for one message type: each field in the encoding protobuf writes is read inline; any other
    encoding (unknown fields, unpacked repeated, mismatched wire types) goes to the generic `_parse_one`."""
    name = message_type.descriptor.name
    namespace: dict = {"_read_varint": _read_varint, "_read_tag": _read_tag, "_as_int": _as_int,
                       "_unpack": _DOUBLE.unpack_from,
                       "_utf8": _utf8, "_slow": message_type._parse_one, "WireError": WireError,
                       "_PAST_END": f"malformed protobuf in {name}: a field runs past the end"}
    varint = ["        if pos >= end:", "            raise WireError(_PAST_END)", "        v = buf[pos]",
              "        pos += 1", "        if v >= 128:", "            v, pos = _read_varint(buf, pos - 1, end)"]
    span = [*varint, "        start = pos", "        pos += v", "        if pos > end:",
            "            raise WireError(_PAST_END)"]
    lines = ["def parse_into(values, buf, pos, end):", "    while pos < end:", "        key = buf[pos]",
             "        pos += 1", "        if key >= 128:", "            key, pos = _read_tag(buf, pos - 1, end)"]
    branch = "if"
    for i, f in enumerate(message_type.fields):
        namespace[f"KIND{i}"] = f.kind
        lines.append(f"        {branch} key == {f.number << 3 | f.wire_type}:")
        branch = "elif"
        body: list[str]
        if f.message is not None and f.message.memo:  # kept as bytes; _build parses them once per distinct value
            body = [*span, f"        values.setdefault({f.name!r}, []).append(bytes(buf[start:pos]))"]
        elif f.message is not None:
            namespace[f"P{i}"] = f.message._parse_into
            body = [*span, f"        sub = values.get({f.name!r})", "        if sub is None:",
                    f"            sub = values[{f.name!r}] = {{}}", f"        P{i}(sub, buf, start, pos)"]
        elif f.repeated:  # ints below 128 (expert numbers) are one byte each: read all at once (bools one by one)
            one_byte = "raw.isascii()" if f.kind != _F.TYPE_BOOL else "False"
            body = [*span, f"        items = values.setdefault({f.name!r}, [])", "        raw = bytes(buf[start:pos])",
                    f"        if {one_byte}:", "            items.extend(raw)", "        else:",
                    "            p = start", "            while p < pos:",
                    "                item, p = _read_varint(buf, p, pos)",
                    f"                items.append(_as_int(item, KIND{i}))"]
        elif f.wire_type == 0:
            exact = f"_as_int(v, KIND{i})"  # truncation and sign; small non-negative values are already right
            convert = exact if f.kind == _F.TYPE_BOOL else f"v if v < 0x80000000 else {exact}"
            body = [*varint, f"        values[{f.name!r}] = {convert}"]
        elif f.wire_type == 1:
            body = ["        start = pos", "        pos += 8", "        if pos > end:",
                    "            raise WireError(_PAST_END)", f"        values[{f.name!r}] = _unpack(buf, start)[0]"]
        elif f.kind == _F.TYPE_STRING:
            body = [*span, f"        values[{f.name!r}] = _utf8(buf[start:pos], {name!r}, {f.name!r})"]
        else:
            body = [*span, f"        values[{f.name!r}] = buf[start:pos]"]
        lines += ["    " + line for line in body]
    lines += ["        else:" if branch == "elif" else "        if True:",
              "            pos = _slow(values, key, buf, pos, end)", "    return values"]
    exec("\n".join(lines), namespace)  # code built from the descriptor alone, no outside input
    return namespace["parse_into"]


Tensor = MessageType(tensor_pb2.Tensor.DESCRIPTOR, factory=WireTensor)
SharedRegion = MessageType(experts_pb2.SharedRegion.DESCRIPTOR)
# Names a tensor in an arena: the same few bytes on every call that reuses the arena.
SharedTensor = MessageType(experts_pb2.SharedTensor.DESCRIPTOR, nested={"moe.v1.SharedRegion": SharedRegion},
                           memo=1024)
_NESTED = {"moe.v1.Tensor": Tensor, "moe.v1.SharedTensor": SharedTensor}
RunExpertsRequest = MessageType(experts_pb2.RunExpertsRequest.DESCRIPTOR, nested=_NESTED)
RunExpertsResponse = MessageType(experts_pb2.RunExpertsResponse.DESCRIPTOR, nested=_NESTED)
ForwardRequest = MessageType(gateway_pb2.ForwardRequest.DESCRIPTOR, nested=_NESTED)
ForwardResponse = MessageType(gateway_pb2.ForwardResponse.DESCRIPTOR, nested=_NESTED)


TYPES = {t.descriptor.full_name: t for t in (RunExpertsRequest, RunExpertsResponse, ForwardRequest, ForwardResponse)}


def serialize(message) -> bytes:
    """grpc request/response serializer for zerocopy messages and ordinary protobuf messages alike."""
    return message.SerializeToString()
