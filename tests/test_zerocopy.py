"""The hand-written protobuf codec: byte-for-byte equal to upb, reads what upb writes, refuses garbage."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_client import wire, zerocopy
from moe_client.pb import experts_pb2, gateway_pb2, tensor_pb2

PB = {zerocopy.RunExpertsRequest: experts_pb2.RunExpertsRequest,
      zerocopy.RunExpertsResponse: experts_pb2.RunExpertsResponse,
      zerocopy.ForwardRequest: gateway_pb2.ForwardRequest, zerocopy.ForwardResponse: gateway_pb2.ForwardResponse}

tensors = st.builds(
    wire.WireTensor,
    dtype=st.integers(0, 6) | st.integers(-3, 2**31 - 1),
    shape=st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 300), max_size=4).map(tuple),
    data=st.binary(max_size=300),
    scales=st.binary(max_size=40),
)
_F = zerocopy._F
scalars = {_F.TYPE_UINT32: st.integers(0, 2**32 - 1), _F.TYPE_UINT64: st.integers(0, 2**64 - 1),
           _F.TYPE_ENUM: st.integers(-(2**31), 2**31 - 1), _F.TYPE_STRING: st.text(max_size=20),
           _F.TYPE_BYTES: st.binary(max_size=40),
           _F.TYPE_DOUBLE: st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0])}
int64s = st.lists(st.integers(-(2**63), 2**63 - 1) | st.integers(0, 300), max_size=4).map(tuple)


def _values(message_type, draw):
    """Random field values for `message_type`, nested messages included (None: left unset)."""
    values = {}
    for f in message_type.fields:
        if f.message is zerocopy.Tensor:
            values[f.name] = draw(st.none() | tensors)
        elif f.message is not None:
            values[f.name] = f.message(**_values(f.message, draw)) if draw(st.booleans()) else None
        elif f.repeated:
            items = int64s if f.kind == _F.TYPE_INT64 else st.lists(scalars[f.kind], max_size=4).map(tuple)
            values[f.name] = draw(items)
        else:
            values[f.name] = draw(scalars[f.kind])
    return values


def _as_pb(pb_class, values):
    kwargs = {}
    for name, v in values.items():
        if v is None:
            continue
        if isinstance(v, wire.WireTensor):
            v = wire.to_message(v)
        elif isinstance(v, zerocopy._View):
            sub = pb_class.DESCRIPTOR.fields_by_name[name].message_type._concrete_class
            v = _as_pb(sub, {f.name: getattr(v, f.name) for f in v._type.fields})
        kwargs[name] = v
    return pb_class(**kwargs)


def _same(got, value) -> bool:
    if value is None:  # an unset message field reads back as the empty message
        return True
    if isinstance(value, wire.WireTensor):
        return (got.dtype, got.shape, bytes(got.data), bytes(got.scales)) == (
            value.dtype, value.shape, bytes(value.data), bytes(value.scales))
    if isinstance(value, zerocopy._View):
        return all(_same(getattr(got, f.name), getattr(value, f.name)) for f in value._type.fields)
    if isinstance(value, bytes):
        return bytes(got) == value
    return got == value or (got != got and value != value)


@pytest.mark.parametrize("message_type", list(PB), ids=lambda t: t.descriptor.name)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_serialization_equals_upb_byte_for_byte(message_type, data):
    values = _values(message_type, data.draw)
    ours = message_type(**values).SerializeToString()
    assert ours == _as_pb(PB[message_type], values).SerializeToString()
    back = message_type.parse(ours)
    for name, value in values.items():
        if value is not None:
            assert _same(getattr(back, name), value), name


def test_parse_follows_protobuf_merge_rules():
    # Concatenated messages merge (scalars: last wins; submessages merge; repeated append); unknown
    # fields are skipped; unpacked repeated ints are accepted. upb's reading is the reference.
    first = experts_pb2.RunExpertsRequest(layer=3, hidden=tensor_pb2.Tensor(dtype=1, shape=[2], data=b"abcdefgh"),
                                          request_id="one").SerializeToString()
    second = experts_pb2.RunExpertsRequest(layer=5, hidden=tensor_pb2.Tensor(shape=[7], scales=b"s"))
    second = second.SerializeToString()
    unknown = b"\xa0\x06\x2a" + b"\xaa\x06\x03xyz"  # field 100 varint, field 101 bytes
    unpacked_shape = b"\x12\x04" + b"\x10\x09\x10\x0b"  # hidden { shape: 9 shape: 11 } written unpacked
    wire_bytes = first + unknown + second + unpacked_shape
    theirs = experts_pb2.RunExpertsRequest.FromString(wire_bytes)
    ours = zerocopy.RunExpertsRequest.parse(wire_bytes)
    assert ours.layer == theirs.layer == 5 and ours.request_id == theirs.request_id == "one"
    assert ours.hidden.shape == tuple(theirs.hidden.shape) == (2, 7, 9, 11)
    assert bytes(ours.hidden.data) == theirs.hidden.data and bytes(ours.hidden.scales) == theirs.hidden.scales
    assert ours.expert_ids == wire.WireTensor()  # unset submessage reads as the default, as in protobuf


def test_packed_ints_are_written_by_value_whatever_holds_them():
    # Small values take a one-byte-each path; an array holding them is read by value, not by its memory.
    rng = np.random.default_rng()
    small, large = rng.integers(0, 128, 40), rng.integers(128, 1 << 32, 5)  # experts: uint32
    for experts in (small, np.concatenate([small, large]), torch.from_numpy(small)):
        want = experts_pb2.RunExpertsRequest(experts=[int(e) for e in experts]).SerializeToString()
        assert zerocopy.RunExpertsRequest(experts=experts).SerializeToString() == want
        assert zerocopy.RunExpertsRequest(experts=tuple(int(e) for e in experts)).SerializeToString() == want
        assert zerocopy.RunExpertsRequest.parse(want).experts == tuple(int(e) for e in experts)


def test_remembered_submessages_merge_as_protobuf_and_outlive_the_buffer():
    # SharedTensor fields are parsed once per distinct bytes (zerocopy's memo): occurrences still merge as upb
    # merges them, one reused instance is handed out for the same bytes, and its bytes fields are its own.
    first = experts_pb2.RunExpertsRequest(shared_hidden=experts_pb2.SharedTensor(
        dtype=1, shape=[2, 3], offset=256, region=experts_pb2.SharedRegion(name="moe-a", size=4096, key=b"k1")))
    second = experts_pb2.RunExpertsRequest(layer=4, shared_hidden=experts_pb2.SharedTensor(
        offset=512, shape=[5], region=experts_pb2.SharedRegion(key=b"k2")))
    for wire_bytes in (first.SerializeToString() + second.SerializeToString(), first.SerializeToString()):
        theirs = experts_pb2.RunExpertsRequest.FromString(wire_bytes).shared_hidden
        buffer = bytearray(wire_bytes)
        ours = zerocopy.RunExpertsRequest.parse(buffer).shared_hidden
        buffer[:] = bytes(len(buffer))  # the frame's buffer reused for the next call
        assert (ours.dtype, ours.shape, ours.offset) == (theirs.dtype, tuple(theirs.shape), theirs.offset)
        assert (ours.region.name, ours.region.size, bytes(ours.region.key)) == (
            theirs.region.name, theirs.region.size, theirs.region.key)
        assert zerocopy.RunExpertsRequest.parse(wire_bytes).shared_hidden is ours


def test_parse_borrows_tensor_bytes():
    hidden = np.random.default_rng().standard_normal((3, 8), dtype=np.float32)
    data = zerocopy.ForwardRequest(hidden=wire.encode_view(hidden)).SerializeToString()
    parsed = zerocopy.ForwardRequest.parse(data)
    assert isinstance(parsed.hidden.data, memoryview) and parsed.hidden.data.obj is data
    assert np.array_equal(wire.decode(parsed.hidden), hidden)


@pytest.mark.parametrize("garbage", [b"\x12\x05abc", b"\x12", b"\x0b", b"\x08" + b"\xff" * 11, b"\x32\x02\xff\xfe"])
def test_malformed_input_raises_wire_error(garbage):
    with pytest.raises(wire.WireError, match="malformed protobuf"):
        zerocopy.RunExpertsRequest.parse(garbage)


def test_unknown_field_name_is_refused():
    with pytest.raises(TypeError, match="layers"):
        zerocopy.RunExpertsRequest(layers=1)
