"""Fuzz every RPC of both services with hypothesis: structured requests with random and malformed dtype,
shape and bytes, huge shapes, NaN/Inf, unknown ids; and raw bytes (garbage, truncated, corrupted valid
messages) sent on a channel with identity serializers. Every call must end within its deadline with a
status code and a message (never INTERNAL or UNKNOWN: those are crashes), and the server must then
still answer a valid request correctly.

MOE_FUZZ_EXAMPLES sets the examples per test (default 40; the report's run used more).
"""

import os

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moe_client import wire
from moe_client.pb import experts_pb2, experts_pb2_grpc, gateway_pb2, gateway_pb2_grpc, tensor_pb2
from tests.support.references import plain_torch, reference_forward

EXAMPLES = int(os.environ.get("MOE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
H = 64
INT64 = st.integers(-(2**63), 2**63 - 1)
DTYPE = st.one_of(st.sampled_from(list(range(7))), st.integers(-(2**31), 2**31 - 1))
CALL_TIMEOUT = 20  # a hang shows as DEADLINE_EXCEEDED, which fails the test
# What a bad request may get; INTERNAL / UNKNOWN / DEADLINE_EXCEEDED would mean a crash or a hang.
EXPERT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.FAILED_PRECONDITION}
GATEWAY_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
GENERATE_CODES = GATEWAY_CODES | {grpc.StatusCode.FAILED_PRECONDITION}  # Generate on a model without an lm_head
MAX_NEW = 6  # the fuzzed causal gateway's --max-new-tokens: every stream ends quickly


FLOAT_WIRE = {"float": ["float32", "bfloat16", "float16"], "weights": ["float32"], "ids": ["int32", "int64"]}


@st.composite
def arrays(draw, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values for a tensor of `shape`: usually plain, sometimes NaN, Inf, huge, or ids nobody owns."""
    n = int(np.prod(shape))
    wild = draw(st.integers(0, 3)) == 0
    if kind == "ids":
        elems = st.one_of(st.integers(-1, 7), st.integers(-(2**31), 2**31 - 1)) if wild else st.integers(-1, 7)
        return np.array(draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.int64).reshape(shape)
    plain = st.floats(-4, 4, width=32)
    elems = st.one_of(plain, st.floats(width=32)) if wild else plain
    return np.array(draw(st.lists(elems, min_size=n, max_size=n)), dtype=np.float32).reshape(shape)


@st.composite
def good_tensors(draw, kind: str, shape: tuple[int, ...]) -> tensor_pb2.Tensor:
    """A well-formed Tensor of an accepted dtype (its values may still be NaN or unknown ids)."""
    with np.errstate(over="ignore"):  # float16 of a huge float32 is Inf: wanted here
        return wire.encode(draw(arrays(kind, shape)), draw(st.sampled_from(FLOAT_WIRE[kind])))


@st.composite
def bad_tensors(draw, kind: str, shape: tuple[int, ...]) -> tensor_pb2.Tensor:
    """A malformed Tensor: unknown or wrong dtype, shape and bytes disagreeing, a huge shape, or junk."""
    how = draw(st.sampled_from(["dtype", "shape", "bytes", "huge", "junk"]))
    msg = draw(good_tensors(kind, shape))
    if how == "dtype":
        msg.dtype = draw(DTYPE)
    elif how == "shape":
        msg.shape[:] = draw(st.lists(st.integers(-3, 130), max_size=4))
    elif how == "bytes":
        msg.data = msg.data[:draw(st.integers(0, len(msg.data)))] + draw(st.binary(max_size=8))
    elif how == "huge":
        msg.shape[:] = [draw(st.integers(2**31, 2**62)), *draw(st.lists(st.integers(0, 2**20), max_size=2))]
    else:
        msg = tensor_pb2.Tensor(dtype=draw(DTYPE), shape=draw(st.lists(INT64, max_size=4)),
                                data=draw(st.binary(max_size=1024)), scales=draw(st.binary(max_size=16)))
    return msg


@st.composite
def run_experts_requests(draw, fingerprint: str) -> experts_pb2.RunExpertsRequest:
    """Mostly well-formed requests with up to two things wrong, so every check down to the experts is reached."""
    rows, k = draw(st.integers(1, 9)), draw(st.integers(1, 3))
    bad = draw(st.sets(st.sampled_from(["hidden", "expert_ids", "weights", "rows", "layer", "dtype", "fingerprint",
                                        "missing"]), max_size=2))
    shapes = {"hidden": (rows, H), "expert_ids": (rows, k), "weights": (rows, k)}
    if "rows" in bad:  # tensors of the request disagree on the token count, or there are none
        shapes[draw(st.sampled_from(sorted(shapes)))] = (draw(st.sampled_from([0, rows + 1])), k)
    kinds = {"hidden": "float", "expert_ids": "ids", "weights": "weights"}
    fields = {name: draw((bad_tensors if name in bad else good_tensors)(kinds[name], shape))
              for name, shape in shapes.items()}
    if "missing" in bad:
        del fields[draw(st.sampled_from(sorted(fields)))]
    return experts_pb2.RunExpertsRequest(
        layer=draw(st.integers(0, 2**32 - 1) if "layer" in bad else st.sampled_from([0, 1])),
        output_dtype=draw(DTYPE if "dtype" in bad else st.sampled_from([0, 1, 2, 3])),
        request_id=draw(st.text(max_size=20)),
        model_fingerprint="f" * 16 if "fingerprint" in bad else draw(st.sampled_from(["", fingerprint])), **fields)


@st.composite
def forward_requests(draw) -> gateway_pb2.ForwardRequest:
    """Hidden states of a plausible shape, well formed or not, and any output dtype."""
    shape = draw(st.sampled_from([(draw(st.integers(1, 9)), H), (2, draw(st.integers(1, 5)), H),
                                  (draw(st.integers(0, 3)), draw(st.sampled_from([H - 1, 1])))]))
    hidden = draw(st.one_of(good_tensors("float", shape), bad_tensors("float", shape)))
    return gateway_pb2.ForwardRequest(hidden=hidden, request_id=draw(st.text(max_size=20)),
                                      output_dtype=draw(st.one_of(st.sampled_from([0, 1, 2, 3]), DTYPE)))


@st.composite
def generate_requests(draw, vocab: int) -> gateway_pb2.GenerateRequest:
    """Mostly valid requests with up to two things wrong: ids outside the vocabulary, prompts past the
    context or empty, text without a tokenizer, huge max_new_tokens, NaN/Inf/negative sampling settings."""
    bad = draw(st.sets(st.sampled_from(["ids", "long", "empty", "text", "max_new", "temperature", "top_p", "stops"]),
                       max_size=2))
    good_id, any_id = st.integers(0, vocab - 1), st.integers(-(2**63), 2**63 - 1)
    weird = st.one_of(st.floats(width=32), st.floats(-10, 0, width=32, exclude_max=True))
    length = 120 if "long" in bad else 0 if "empty" in bad else draw(st.integers(1, 10))
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=draw(st.lists(st.one_of(good_id, any_id) if "ids" in bad else good_id,
                                       min_size=length, max_size=length)),
        max_new_tokens=draw(st.integers(MAX_NEW + 1, 2**32 - 1) if "max_new" in bad else st.integers(0, MAX_NEW)),
        temperature=draw(weird if "temperature" in bad else st.floats(0, 2, width=32)),
        top_k=draw(st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1))),
        top_p=draw(weird if "top_p" in bad else st.floats(0, 1, width=32)),
        stop_token_ids=draw(st.lists(any_id if "stops" in bad else good_id, max_size=3)),
        ignore_eos=draw(st.booleans()), request_id=draw(st.text(max_size=20)))
    if "text" in bad:
        request.prompt_text = draw(st.text(max_size=30))
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, 2**64 - 1))
    return request


def valid_run_experts() -> tuple[experts_pb2.RunExpertsRequest, tuple]:
    rng = np.random.default_rng()
    hidden = rng.standard_normal((4, H), dtype=np.float32)
    ids = rng.integers(0, 8, (4, 2)).astype(np.int32)
    weights = rng.random((4, 2), dtype=np.float32)
    request = experts_pb2.RunExpertsRequest(layer=1, hidden=wire.encode(hidden), expert_ids=wire.encode(ids),
                                            weights=wire.encode(weights))
    return request, (1, hidden, ids, weights)


def check_status(call, allowed: set) -> object | None:
    """Make the call; an error must carry an allowed code and a message. Returns the reply, or None."""
    try:
        reply = call()
        event("OK")
        return reply
    except grpc.RpcError as err:
        event(err.code().name)
        assert err.code() in allowed, f"{err.code().name}: {err.details()}"
        assert err.details(), f"{err.code().name} without a message"
        return None


class Target:
    """A server under fuzz: its channel and stub, and a valid request with its known answer."""

    def __init__(self, address: str, stub_class, valid, expected: np.ndarray, field: str):
        self.channel = grpc.insecure_channel(address)
        self.channel_address = address
        self.stub = stub_class(self.channel)
        self.valid, self.expected, self.field = valid, expected, field

    def still_right(self, method: str) -> None:
        """The server answers the valid request correctly."""
        reply = getattr(self.stub, method)(self.valid, timeout=CALL_TIMEOUT)
        assert np.abs(wire.decode(getattr(reply, self.field)) - self.expected).max() <= 1e-5


@pytest.fixture
def expert(cluster, tiny_checkpoint):
    request, args = valid_run_experts()
    target = Target(cluster.expert_server(tiny_checkpoint), experts_pb2_grpc.ExpertServiceStub, request,
                    plain_torch(tiny_checkpoint, *args), "output")
    target.fingerprint = target.stub.GetInfo(experts_pb2.GetInfoRequest(), timeout=10).model_fingerprint
    yield target
    target.channel.close()


@pytest.fixture
def gateway(cluster, tiny_checkpoint):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    hidden = np.random.default_rng().standard_normal((3, H), dtype=np.float32)
    target = Target(cluster.gateway(tiny_checkpoint, servers), gateway_pb2_grpc.GatewayServiceStub,
                    gateway_pb2.ForwardRequest(hidden=wire.encode(hidden)), reference_forward(tiny_checkpoint, hidden),
                    "hidden")
    yield target
    target.channel.close()


@FUZZ
@given(data=st.data())
def test_fuzz_run_experts(expert, data):
    request = data.draw(run_experts_requests(expert.fingerprint))
    reply = check_status(lambda: expert.stub.RunExperts(request, timeout=CALL_TIMEOUT), EXPERT_CODES)
    if reply is not None:  # it was valid after all: the answer has the right shape
        assert list(reply.output.shape) == [request.hidden.shape[0], H]
    expert.still_right("RunExperts")


@FUZZ
@given(request=forward_requests())
def test_fuzz_forward(gateway, request):
    reply = check_status(lambda: gateway.stub.Forward(request, timeout=CALL_TIMEOUT), GATEWAY_CODES)
    if reply is not None:
        assert list(reply.hidden.shape) == list(request.hidden.shape)
    gateway.still_right("Forward")


@pytest.fixture
def causal_gateway(cluster, causal_checkpoints):
    """A gateway over a tiny Mixtral: a valid Generate request and its greedy continuation."""
    from tests.support.references import reference_greedy

    path = causal_checkpoints["mixtral"]
    servers = [cluster.expert_server(path, experts=e) for e in ("0-3", "4-7")]
    prompt = np.random.default_rng().integers(0, 100, size=5).tolist()
    target = Target(cluster.gateway(path, servers, max_new_tokens=MAX_NEW), gateway_pb2_grpc.GatewayServiceStub,
                    gateway_pb2.GenerateRequest(prompt_token_ids=prompt, max_new_tokens=3, ignore_eos=True),
                    np.array(reference_greedy(path, prompt, 3)), "token_id")
    target.vocab = 160
    yield target
    target.channel.close()


def generated(stub, request) -> np.ndarray:
    """The token ids of a Generate stream."""
    return np.array([m.token_id for m in stub.Generate(request, timeout=CALL_TIMEOUT)])


@FUZZ
@given(data=st.data())
def test_fuzz_generate(causal_gateway, data):
    request = data.draw(generate_requests(causal_gateway.vocab))
    tokens = check_status(lambda: generated(causal_gateway.stub, request), GENERATE_CODES)
    if tokens is not None:  # a valid request: between 1 and max_new_tokens ids from the vocabulary
        assert 1 <= len(tokens) <= (request.max_new_tokens or 16) and ((tokens >= 0) & (tokens < 160)).all()
    assert (generated(causal_gateway.stub, causal_gateway.valid) == causal_gateway.expected).all()


def _valid_bytes() -> dict[str, bytes]:
    request, _ = valid_run_experts()
    forward = gateway_pb2.ForwardRequest(hidden=wire.encode(np.ones((2, H), np.float32)), request_id="x")
    generate = gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], max_new_tokens=2)
    return {"RunExperts": request.SerializeToString(), "Forward": forward.SerializeToString(),
            "Generate": generate.SerializeToString(), "GetInfo": b"", "GetModelInfo": b""}


VALID_BYTES = _valid_bytes()


def _tag(field: int, wire_type: int) -> bytes:
    key, out = field << 3 | wire_type, bytearray()
    while key >= 128:
        out.append(key & 0x7F | 0x80)
        key >>= 7
    return bytes([*out, key])


@st.composite
def groups(draw, depth: int = 0) -> bytes:
    """A group field (wire types 3..4) of an unused number, with varints, bytes and groups inside; sometimes left
    open or closed with another number, which protobuf refuses."""
    field = draw(st.integers(16, 2**20))
    body = b""
    for _ in range(draw(st.integers(0, 3))):
        inner = draw(st.integers(1, 2**20))
        body += draw(st.sampled_from([_tag(inner, 0) + b"\x05", _tag(inner, 2) + b"\x02ab",
                                      _tag(inner, 5) + b"\x00" * 4]))
        if depth < 3 and draw(st.integers(0, 3)) == 0:
            body += draw(groups(depth + 1))
    end = draw(st.sampled_from(["close"] * 6 + ["open", "other"]))
    close = b"" if end == "open" else _tag(field + (end == "other"), 4)
    return _tag(field, 3) + body + close


@st.composite
def raw_messages(draw, valid: bytes) -> bytes:
    """Garbage, a truncated valid message, a valid one with bytes flipped, or one with junk appended."""
    kind = draw(st.sampled_from(["garbage", "truncated", "flipped", "appended", "group", "field0"]))
    if kind == "garbage" or not valid:
        return draw(st.binary(max_size=2048))
    if kind in ("group", "field0"):  # what protobuf skips (groups, maybe left open) or refuses (field number 0)
        extra = draw(groups()) if kind == "group" else bytes([draw(st.sampled_from([0, 1, 2, 5]))]) + b"\x00"
        return extra + valid if draw(st.booleans()) else valid + extra
    if kind == "truncated":
        return valid[:draw(st.integers(0, max(0, len(valid) - 1)))]
    if kind == "flipped":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return valid + draw(st.binary(min_size=1, max_size=64))


@pytest.mark.parametrize("service,method", [("expert", "RunExperts"), ("expert", "GetInfo"),
                                            ("gateway", "Forward"), ("gateway", "GetModelInfo")])
@FUZZ
@given(data=st.data())
def test_fuzz_raw_bytes(expert, gateway, service, method, data):
    target = expert if service == "expert" else gateway
    full = f"/moe.v1.{'ExpertService' if service == 'expert' else 'GatewayService'}/{method}"
    raw = target.channel.unary_unary(full, request_serializer=None, response_deserializer=None)  # bytes as they are
    allowed = (EXPERT_CODES if service == "expert" else GATEWAY_CODES) | {grpc.StatusCode.NOT_FOUND}
    payload = data.draw(raw_messages(VALID_BYTES[method]))
    check_status(lambda: raw(payload, timeout=CALL_TIMEOUT), allowed)
    expert.still_right("RunExperts")
    gateway.still_right("Forward")


@FUZZ
@given(data=st.data())
def test_fuzz_raw_bytes_generate(causal_gateway, data):
    raw = causal_gateway.channel.unary_stream("/moe.v1.GatewayService/Generate", request_serializer=None,
                                              response_deserializer=None)
    payload = data.draw(raw_messages(VALID_BYTES["Generate"]))
    check_status(lambda: list(raw(payload, timeout=CALL_TIMEOUT)), GENERATE_CODES)
    assert (generated(causal_gateway.stub, causal_gateway.valid) == causal_gateway.expected).all()


@pytest.mark.parametrize("message", [
    b"\x99\x80\x80\x80\x10" + bytes(8),  # a key of 2^32 + 25 (field 2^29 + 3): found by the fuzzer below in CI
    b"\xf9\xff\xff\xff\x0f" + bytes(8),  # the largest key, field 2^29 - 1: an unknown field, skipped
    b"\x88\x80\x80\x80\x80\x00\x05",  # the key of `layer` (8) in 6 bytes: over the 5 a key may take
    b"\x88\x80\x80\x80\x00\x05",  # ... in 5 bytes: accepted
])
def test_codec_reads_keys_as_protobuf_does(message):
    """Keys are 32-bit varints of at most 5 bytes; anything else is malformed even when it encodes a known key."""
    from moe_client import zerocopy
    from moe_client.wire import WireError

    try:
        expected = experts_pb2.RunExpertsRequest.FromString(message)
    except Exception:
        expected = None
    try:
        got = zerocopy.RunExpertsRequest.parse(message)
    except WireError:
        got = None
    assert (got is None) == (expected is None)
    if got is not None:
        assert got.layer == expected.layer


@FUZZ
@given(data=st.data())
def test_fuzz_codec_accepts_what_protobuf_accepts(data):
    """The zero-copy codec parses what protobuf parses and refuses what it refuses: groups, field number 0."""
    from moe_client import zerocopy
    from moe_client.wire import WireError

    name = data.draw(st.sampled_from(["RunExperts", "Forward"]))
    message = data.draw(raw_messages(VALID_BYTES[name]))
    pb_type = experts_pb2.RunExpertsRequest if name == "RunExperts" else gateway_pb2.ForwardRequest
    ours = zerocopy.RunExpertsRequest if name == "RunExperts" else zerocopy.ForwardRequest
    try:
        expected = pb_type.FromString(message)
    except Exception:
        expected = None
    try:
        got = ours.parse(message)
    except WireError:
        got = None
    event("protobuf accepts" if expected is not None else "protobuf refuses")
    assert (got is None) == (expected is None), message
    if got is not None:
        assert bytes(got.hidden.data) == expected.hidden.data


SHM_CODES = EXPERT_CODES | {grpc.StatusCode.OK}


@pytest.fixture
def planted_regions(expert):
    """/dev/shm as an attacker leaves it: a real region, a symlink to it, a FIFO, a file too small, and (as root)
    a file of another user; all removed afterwards."""
    import secrets

    import torch

    from moe_serve.rpc.shared_regions import SHM_DIR, Arena

    arena = Arena(torch.device("cpu"), 1 << 20)
    tag = secrets.token_hex(4)
    paths = {"link": SHM_DIR / f"moe-fzl{tag}", "fifo": SHM_DIR / f"moe-fzf{tag}", "small": SHM_DIR / f"moe-fzs{tag}",
             "other": SHM_DIR / f"moe-fzo{tag}"}
    paths["link"].symlink_to(SHM_DIR / arena.region.name)
    os.mkfifo(paths["fifo"], 0o600)
    paths["small"].write_bytes(bytes(arena.region.key) + bytes(100))
    paths["other"].write_bytes(bytes(arena.region.key) + bytes(arena.region.size))
    if os.geteuid() == 0:
        os.chown(paths["other"], 65534, -1)
    names = {"region": arena.region.name, **{k: p.name for k, p in paths.items()}, "missing": f"moe-fzm{tag}"}
    yield arena, names, {k: paths[k].read_bytes() for k in ("small", "other")}
    for path in paths.values():
        path.unlink(missing_ok=True)
    arena.close()


@FUZZ
@given(data=st.data())
def test_fuzz_shared_regions(expert, planted_regions, data):
    """RunExperts naming regions, real and planted, with right and wrong keys, sizes, offsets and shapes: every
    refused region gets the one answer, no planted file changes, and the server stays right."""
    from moe_client import zerocopy
    from moe_serve.rpc import shared_regions, shm_files
    from tests.support.calls import run_experts

    arena, names, contents = planted_regions
    which = data.draw(st.sampled_from(sorted(names)))
    key = bytes(arena.region.key)
    key = data.draw(st.sampled_from([key, key[:8], b"", os.urandom(16)]))
    size = data.draw(st.sampled_from([arena.region.size, arena.region.size * 2, 512, 0]))
    rows = data.draw(st.integers(1, 9))
    offset = data.draw(st.sampled_from([256, 0, 260, arena.region.size - 1024, arena.region.size]))
    field = data.draw(st.sampled_from(["shared_hidden", "shared_output"]))
    region = zerocopy.SharedRegion(kind=shared_regions.SHM, name=names[which], size=size, key=key)
    shared = zerocopy.SharedTensor(dtype=wire.FLOAT32, shape=(rows, H), region=region, offset=offset)
    rng = np.random.default_rng()
    fields = {field: shared} if field == "shared_hidden" else {
        "hidden": wire.encode_view(rng.standard_normal((rows, H), dtype=np.float32)), field: shared}
    request = zerocopy.RunExpertsRequest(
        layer=1, expert_ids=wire.encode_view(rng.integers(0, 8, (rows, 2)).astype(np.int32)),
        weights=wire.encode_view(rng.random((rows, 2), dtype=np.float32)), **fields)
    try:
        run_experts(expert.channel_address, request, timeout=CALL_TIMEOUT)
        event(f"{which}: OK")
        assert which == "region", "a planted file was used"
    except grpc.RpcError as err:
        event(f"{which}: {err.code().name}")
        assert err.code() in SHM_CODES, err.details()
        if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
            assert err.details() == shm_files.refusal(field, names[which]), err.details()
    for name, content in contents.items():
        assert (shared_regions.SHM_DIR / names[name]).read_bytes() == content
    expert.still_right("RunExperts")
