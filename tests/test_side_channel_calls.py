"""The side channel: RunExperts from the gateway's model thread over a Unix socket (same host, tensors in shared
memory) or TCP (tensors in the frames), gRPC as the fallback. Sums equal the reference, bad requests get the gRPC
codes, a server that goes away fails over, only the server's user (or root) gets in on the Unix socket, and only
callers with the token on either."""

import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from moe_client import GatewayClient, wire
from moe_client.pb import experts_pb2
from moe_serve.expert_server import side_calls
from moe_serve.gateway import side_dispatch
from moe_serve.gateway.batching_config import BatchingConfig
from moe_serve.rpc.side_channel import ChannelClosed, ChannelError, SideLink, SideListener
from tests.support.busy import bank_held
from tests.support.failover import forwards_while_one_stops
from tests.support.references import reference_forward
from tests.support.waiting import wait_for


def _local_calls(cluster, server: str) -> int:
    side = cluster.expert_servicers[server].side
    return 0 if side is None or side.unix is None else side.unix.calls


def _tcp_calls(cluster, server: str) -> int:
    side = cluster.expert_servicers[server].side
    return 0 if side is None or side.tcp is None else side.tcp.calls


def _gateway_dispatcher(cluster, gateway: str):
    return cluster.servicers[gateway].engine.experts.inner


def _gateway_pool(cluster, gateway: str):
    return _gateway_dispatcher(cluster, gateway).pool


def _wait_linked(cluster, gateway: str, tcp: bool) -> None:
    """The gateway's TCP links are made off its event loop: wait until every server has one."""
    pool = _gateway_pool(cluster, gateway)
    wait_for(lambda: all(r.side_link() is not None and r.side_link().tcp == tcp for r in pool.members),
             "side channels to every server", timeout=20)


def _grpc_computations(cluster, server: str) -> int:
    """The merger's computations: gRPC calls' (and side-channel calls of side_calls.MERGED_FROM_BYTES or more)."""
    return cluster.expert_servicers[server].merger.computations


def _forwards_equal_reference(gateway: str, checkpoint, sizes) -> list[np.ndarray]:
    """Forwards of fresh random inputs of `sizes` tokens, each checked against the reference; the inputs."""
    rng = np.random.default_rng()
    inputs = [rng.standard_normal((n, 64), dtype=np.float32) for n in sizes]
    with GatewayClient(gateway) as client:
        outputs = [client.forward(x) for x in inputs]
    for x, got in zip(inputs, outputs, strict=True):
        assert np.abs(got - reference_forward(checkpoint, x)).max() <= 1e-5
    return inputs


@pytest.mark.parametrize("same_host_calls", [True, False])
def test_forward_over_the_same_host_channel_equals_reference(cluster, tiny_checkpoint, same_host_calls):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-2", "3-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers, same_host_calls=same_host_calls,
                              batching=BatchingConfig(batching=False))
    inputs = _forwards_equal_reference(gateway, tiny_checkpoint, (1, 7, 300))
    local = sum(_local_calls(cluster, s) for s in servers)
    grpc_calls = sum(_grpc_computations(cluster, s) for s in servers)
    assert all(r.outstanding == 0 for r in cluster.servicers[gateway].engine.experts.inner.pool.members)
    if same_host_calls:
        assert local >= 2 * len(inputs) and grpc_calls == 0  # 2 MoE layers per Forward, >= 1 server each
    else:
        assert local == 0 and grpc_calls >= 2 * len(inputs)


@pytest.mark.parametrize("tails", [True, False], ids=["tail frames", "whole frames"])
def test_forward_over_tcp_equals_reference(cluster, tiny_checkpoint, tails, monkeypatch):
    """Without shared memory, calls go over the servers' TCP side channels with the tensors' bytes in the frames,
    large ones (3,000 tokens: 750 KiB of hidden states each way) included; none by gRPC. The outputs land in the
    gateway's own buffers (tail frames; here every reply, however small), or, from servers that do not send
    those, are read from whole frames."""
    monkeypatch.setattr(side_dispatch, "LAND_MIN_BYTES", 0)
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-2", "3-7")]
    for server in servers:
        cluster.expert_servicers[server].side.tcp.tails = tails  # before the gateway connects
    gateway = cluster.gateway(tiny_checkpoint, servers, shared_memory=False, batching=BatchingConfig(batching=False))
    _wait_linked(cluster, gateway, tcp=True)
    inputs = _forwards_equal_reference(gateway, tiny_checkpoint, (1, 7, 3000))
    calls = sum(_tcp_calls(cluster, s) for s in servers)
    assert calls >= 2 * len(inputs)
    assert sum(_grpc_computations(cluster, s) for s in servers) == 0
    assert sum(_local_calls(cluster, s) for s in servers) == 0
    assert all(r.outstanding == 0 for r in _gateway_pool(cluster, gateway).members)
    assert _gateway_dispatcher(cluster, gateway).landed_calls == (calls if tails else 0)


def test_small_tcp_replies_are_read_whole_and_large_ones_land(cluster, tiny_checkpoint):
    """Replies under output_tails.LAND_MIN_BYTES (64 KiB) come in whole frames (a copy of a few KiB costs less
    than a tail frame's extra read); with one server owning every expert the sizes are known: 1 and 7 tokens x 64
    x fp32 do not land, 3,000 (750 KiB) do, in both MoE layers."""
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    gateway = cluster.gateway(tiny_checkpoint, [server], shared_memory=False, batching=BatchingConfig(batching=False))
    _wait_linked(cluster, gateway, tcp=True)
    dispatcher = _gateway_dispatcher(cluster, gateway)
    _forwards_equal_reference(gateway, tiny_checkpoint, (1, 7))
    assert dispatcher.landed_calls == 0
    _forwards_equal_reference(gateway, tiny_checkpoint, (3000,))
    assert dispatcher.landed_calls == 2


@pytest.mark.parametrize("owners", [("0-2", "3-7"), ("0-7",)], ids=["two servers", "one server"])
def test_large_tcp_calls_are_split_over_the_lanes(cluster, tiny_checkpoint, owners, monkeypatch):
    """A call of 2 x min_piece_bytes of hidden states or more goes as pieces of rows, one per TCP link, each a frame
    the server answers on its own connection; the sums equal the reference. With one server, its share has every
    row and its pieces land side by side in the buffer that becomes the layer's sum (every reply lands here,
    however small its share)."""
    monkeypatch.setattr(side_dispatch, "LAND_MIN_BYTES", 0)
    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in owners]
    gateway = cluster.gateway(tiny_checkpoint, servers, shared_memory=False, tcp_lanes=3, min_piece_bytes=64 * 4 * 8,
                              batching=BatchingConfig(batching=False))
    pool = _gateway_pool(cluster, gateway)
    wait_for(lambda: all(len(r.side_lanes()) == 3 for r in pool.members), "3 TCP links per server", timeout=20)
    rng = np.random.default_rng()
    hidden = rng.standard_normal((int(rng.integers(300, 500)), 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    # 300+ tokens x top-2 of 8: each server's share of each of the 2 layers is far over 3 pieces' worth (8 rows).
    assert all(_tcp_calls(cluster, s) == 3 * 2 for s in servers)
    assert all(r.outstanding == 0 for r in pool.members)
    assert _gateway_dispatcher(cluster, gateway).landed_calls == 2 * len(servers)  # each call's 3 pieces in one


def test_several_pieces_a_lane_go_in_order_on_each_link(cluster, tiny_checkpoint, monkeypatch):
    """With --tcp-pieces-per-lane 3 over 2 links a large call goes as 6 pieces, piece i on link i mod 2, each link's
    sent one after another by one thread in row order (so the server answers one while the next arrives); they
    all land side by side and the sums equal the reference."""
    monkeypatch.setattr(side_dispatch, "LAND_MIN_BYTES", 0)
    sends = []  # (link, thread, first byte of the piece's landing rows), in the order the frames went
    send = SideLink.send

    def recorded(link, payload, timeout=None, into=None):
        sends.append((id(link), threading.get_ident(), np.frombuffer(into, np.uint8).ctypes.data))
        return send(link, payload, timeout, into)

    monkeypatch.setattr(SideLink, "send", recorded)
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    gateway = cluster.gateway(tiny_checkpoint, [server], shared_memory=False, tcp_lanes=2, pieces_per_lane=3,
                              min_piece_bytes=64 * 4 * 8, batching=BatchingConfig(batching=False))
    pool = _gateway_pool(cluster, gateway)
    wait_for(lambda: len(pool.members[0].side_lanes()) == 2, "2 TCP links", timeout=20)
    rng = np.random.default_rng()
    hidden = rng.standard_normal((int(rng.integers(300, 500)), 64), dtype=np.float32)  # 6 pieces: 48 rows at least
    with GatewayClient(gateway) as client:
        got = client.forward(hidden)
    assert np.abs(got - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    assert _tcp_calls(cluster, server) == 6 * 2 and len(sends) == 6 * 2
    for layer in (sends[:6], sends[6:]):
        links = {link for link, _, _ in layer}
        assert len(links) == 2
        for link in links:
            mine = [(thread, at) for other, thread, at in layer if other == link]
            assert len(mine) == 3 and len({thread for thread, _ in mine}) == 1  # one thread sent them ...
            assert [at for _, at in mine] == sorted(at for _, at in mine)  # ... in row order
    assert _gateway_dispatcher(cluster, gateway).landed_calls == 2
    assert pool.members[0].outstanding == 0


def test_the_pieces_of_a_split_call_are_computed_as_one(cluster, tiny_checkpoint, monkeypatch):
    """Pieces of a large call arrive at once on their own connections and go to the merger, which computes them
    as one (each expert once over all their rows); small calls compute on their connection's thread. Here every
    call counts as large (MERGED_FROM_BYTES 0), and the bank is held until layer 0's 3 pieces have queued."""
    monkeypatch.setattr(side_calls, "MERGED_FROM_BYTES", 0)
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    servicer = cluster.expert_servicers[server]
    gateway = cluster.gateway(tiny_checkpoint, [server], shared_memory=False, tcp_lanes=3, min_piece_bytes=64 * 4 * 8,
                              batching=BatchingConfig(batching=False))
    wait_for(lambda: len(_gateway_pool(cluster, gateway).members[0].side_lanes()) == 3, "3 TCP links", timeout=20)
    rng = np.random.default_rng()
    hidden = rng.standard_normal((int(rng.integers(300, 500)), 64), dtype=np.float32)
    got = {}
    with GatewayClient(gateway) as client:
        with bank_held(servicer):
            caller = threading.Thread(target=lambda: got.update(out=client.forward(hidden)))
            caller.start()
            wait_for(lambda: len(servicer.merger._pending) == 3, "layer 0's 3 pieces queued", timeout=20)
        caller.join(60)
    assert np.abs(got["out"] - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5
    assert servicer.merger.merged_calls >= 3  # layer 0's pieces in one computation (layer 1's as they came)
    assert servicer.merger.computations <= 1 + 3
    assert _tcp_calls(cluster, server) == 3 * 2


def test_small_tcp_calls_compute_on_their_connections_thread(cluster, tiny_checkpoint):
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    gateway = cluster.gateway(tiny_checkpoint, [server], shared_memory=False, batching=BatchingConfig(batching=False))
    _wait_linked(cluster, gateway, tcp=True)
    _forwards_equal_reference(gateway, tiny_checkpoint, (1, 7, 300))  # 75 KiB at most: under MERGED_FROM_BYTES
    assert _tcp_calls(cluster, server) == 2 * 3
    assert _grpc_computations(cluster, server) == 0


def test_tcp_calls_off_go_by_grpc(cluster, tiny_checkpoint):
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    gateway = cluster.gateway(tiny_checkpoint, [server], shared_memory=False, tcp_calls=False,
                              batching=BatchingConfig(batching=False))
    x = np.random.default_rng().standard_normal((5, 64), dtype=np.float32)
    with GatewayClient(gateway) as client:
        assert np.abs(client.forward(x) - reference_forward(tiny_checkpoint, x)).max() <= 1e-5
    assert _tcp_calls(cluster, server) == 0 and _grpc_computations(cluster, server) >= 2
    assert all(r.side_link() is None for r in _gateway_pool(cluster, gateway).members)


@pytest.mark.parametrize("shared_memory", [True, False])
def test_a_server_that_stops_fails_over_to_its_replica(cluster, tiny_checkpoint, shared_memory):
    """The stopped server's channel (Unix or TCP) closes; its experts go to the other replica by gRPC, then over
    its own channel: no Forward fails."""
    servers = [cluster.expert_server(tiny_checkpoint, experts="0-7") for _ in range(2)]
    # Over TCP, calls of 16 tokens split over the lanes (2 rows a piece at least): the split ones fail over too.
    gateway = cluster.gateway(tiny_checkpoint, servers, shared_memory=shared_memory, min_piece_bytes=64 * 4 * 2,
                              batching=BatchingConfig(batching=False))
    _wait_linked(cluster, gateway, tcp=not shared_memory)
    forwards_while_one_stops(cluster, gateway, tiny_checkpoint, servers[0], forwards=12, stop_before=4)
    assert (_local_calls if shared_memory else _tcp_calls)(cluster, servers[1]) > 0


def _request(layer: int = 0, tokens: int = 4, weights=None) -> bytes:
    hidden = torch.randn(tokens, 64)
    ids = torch.randint(0, 8, (tokens, 2), dtype=torch.int32)
    w = torch.rand(tokens, 2) if weights is None else weights
    request = experts_pb2.RunExpertsRequest(layer=layer, output_dtype=wire.FLOAT32)
    for field, tensor in (("hidden", hidden), ("expert_ids", ids), ("weights", w)):
        getattr(request, field).CopyFrom(wire.encode(tensor.numpy()))
    return request.SerializeToString()


@pytest.mark.parametrize("tcp", [False, True])
def test_bad_requests_get_the_grpc_codes_and_the_channel_goes_on(cluster, tiny_checkpoint, tcp):
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    side = cluster.expert_servicers[server].side
    link = SideLink(f"127.0.0.1:{side.tcp_port}", tcp=True) if tcp else SideLink(side.address)
    try:
        cases = [
            (b"\x0a\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "not a RunExpertsRequest"),
            (_request(weights=torch.full((4, 2), float("nan"))), grpc.StatusCode.INVALID_ARGUMENT, "weights"),
            (_request(layer=7), grpc.StatusCode.NOT_FOUND, "layer 7"),
        ]
        for payload, code, words in cases:
            with pytest.raises(ChannelError) as err:
                link.receive(link.send(payload), 10)
            assert err.value.code == code and words in err.value.details
        reply = experts_pb2.RunExpertsResponse.FromString(bytes(link.receive(link.send(_request()), 10)))
        assert list(reply.output.shape) == [4, 64]
    finally:
        link.close()


def _sleep_then_echo(payload: memoryview) -> bytes:
    """A side-channel handler: sleeps the seconds its payload names, then answers the payload."""
    time.sleep(float(bytes(payload).decode()))
    return bytes(payload)


def test_replies_reach_their_own_waiters_and_late_ones_are_dropped():
    """Two threads wait on one link for replies that come back in the other order; a reply whose wait
    timed out is dropped, and the link goes on."""
    listener = SideListener(_sleep_then_echo)
    link = SideLink(listener.address)
    try:
        got = {}
        slow, fast = link.send(b"0.3"), link.send(b"0.0")  # answered in order: fast waits behind slow

        def wait(seq):
            got[seq] = bytes(link.receive(seq, 10))

        threads = [threading.Thread(target=wait, args=(s,)) for s in (fast, slow)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == {slow: b"0.3", fast: b"0.0"}
        late = link.send(b"0.5")
        with pytest.raises(TimeoutError):
            link.receive(late, 0.05)
        assert bytes(link.receive(link.send(b"0.0"), 10)) == b"0.0"  # the late reply was skipped
    finally:
        link.close()
        listener.close()


def test_a_reply_that_came_in_time_is_not_lost_while_another_thread_reads_it(monkeypatch):
    """Thread B holds the socket, reading (slowly: a thread the GIL starves) the reply that A waits for; A's
    deadline passes meanwhile. A still gets its reply: it gives up only when a look at the socket after its
    deadline finds nothing (a CI run failed over a healthy server this way: "no reply within 0s")."""
    from moe_serve.rpc import side_channel

    entered = threading.Event()
    read_frame = side_channel.read_frame

    def slow_read(sock, max_bytes, claim=None):
        if threading.current_thread().name == "reader-b":
            entered.set()
            time.sleep(0.2)
        return read_frame(sock, max_bytes, claim)

    listener = SideListener(lambda payload: bytes(payload))
    link = SideLink(listener.address)
    monkeypatch.setattr(side_channel, "read_frame", slow_read)
    try:
        a, b = link.send(b"a"), link.send(b"b")  # answered in order: A's reply is the first frame
        got = {}
        reader = threading.Thread(target=lambda: got.update(b=bytes(link.receive(b, 10))), name="reader-b")
        reader.start()
        assert entered.wait(10)  # B is reading A's frame
        assert bytes(link.receive(a, 0.01)) == b"a"
        reader.join(10)
        assert got == {"b": b"b"}
    finally:
        link.close()
        listener.close()


def test_a_reply_is_dated_only_when_it_was_waited_for():
    """receive_dated: a reply that came while a thread waited in select is dated (the call's latency, which
    the gateway's call budget learns from); one already in the socket is not (it came while the caller did
    something else, and reading it late must not make the server look slow)."""
    release = threading.Event()
    released_at = []

    def held_back(payload: memoryview) -> bytes:
        release.wait(10)  # the first reply goes only once the caller is waiting for it
        return bytes(payload)

    listener = SideListener(held_back)
    link = SideLink(listener.address)

    def release_once_waiting() -> None:
        wait_for(lambda: link._reading, "the caller reading the socket", 10, interval=0.001)
        time.sleep(0.3)  # the caller is in select by now (it only had to call it)
        released_at.append(time.perf_counter())
        release.set()

    try:
        helper = threading.Thread(target=release_once_waiting)
        helper.start()
        reply, arrived = link.receive_dated(link.send(b"first"), 10)
        read = time.perf_counter()
        helper.join()
        assert bytes(reply) == b"first" and released_at[0] <= arrived <= read  # dated when it came
        seq = link.send(b"second")  # answered at once (release is set)
        assert select.select([link.sock], [], [], 10)[0]  # the reply is in the socket before we look
        reply, arrived = link.receive_dated(seq, 10)
        assert bytes(reply) == b"second" and arrived == 0.0
    finally:
        release.set()
        link.close()
        listener.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a caller as another user")
def test_only_the_servers_user_gets_in():
    listener = SideListener(lambda payload: b"ok")
    try:
        probe = (f"import os, socket; os.setuid(65534); s = socket.socket(socket.AF_UNIX); "
                 f"s.connect('\\0{listener.address}'); s.settimeout(5); print(len(s.recv(64)))")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "0"  # closed at once, not a byte sent
        link = SideLink(listener.address)  # root (this process) is let in
        assert bytes(link.receive(link.send(b"x"), 10)) == b"ok"
        link.close()
    finally:
        listener.close()


def test_a_stuck_server_times_out_on_the_channel_and_the_link_recovers(cluster, tiny_checkpoint):
    """rpc_timeout bounds a call on the channel as over gRPC (UNAVAILABLE naming the layer, the only replica
    having timed out); once the server frees up, its late reply is dropped and the next calls are right."""
    server = cluster.expert_server(tiny_checkpoint)
    gateway = cluster.gateway(tiny_checkpoint, [server], rpc_timeout=0.5, batching=BatchingConfig(batching=False))
    hidden = np.random.default_rng().standard_normal((4, 64), dtype=np.float32)
    with GatewayClient(gateway, timeout=30) as client:
        with bank_held(cluster.expert_servicers[server]), pytest.raises(grpc.RpcError) as err:
            client.forward(hidden)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "DEADLINE_EXCEEDED" in err.value.details() and "layer 0 experts" in err.value.details()
        pool = cluster.servicers[gateway].engine.experts.inner.pool
        pool.replicas[server].ejected_until = 0.0  # skipped after the timeout; the test needs no wait for it
        wait_for(lambda: np.abs(client.forward(hidden) - reference_forward(tiny_checkpoint, hidden)).max() <= 1e-5,
                 "a correct answer after the stall")
    assert _local_calls(cluster, server) >= 2
    assert pool.replicas[server].outstanding == 0  # the timed-out call's work left the count too


def test_the_tcp_channel_takes_only_callers_with_the_token():
    listener = SideListener(lambda payload: bytes(payload), token="s3cret", tcp=("127.0.0.1", 0))
    try:
        for token in (None, "wrong"):
            with pytest.raises(ChannelError) as err:
                SideLink(listener.address, token=token, tcp=True)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        link = SideLink(listener.address, token="s3cret", tcp=True)
        payload = np.random.default_rng().bytes(3 << 20)  # a large frame, sent from pieces, echoed whole
        assert bytes(link.receive(link.send([payload[:5], memoryview(payload)[5:]]), 10)) == payload
        link.close()
    finally:
        listener.close()


def test_a_send_to_a_peer_that_stopped_reading_fails_instead_of_blocking():
    """A TCP peer that no longer reads (a cut link looks the same): once its buffers are full, a send waits at most
    the link's timeout, then the link closes and the caller fails over."""
    release = threading.Event()
    listener = SideListener(lambda payload: release.wait(30) and b"", tcp=("127.0.0.1", 0), max_bytes=256 << 20)
    link = SideLink(listener.address, tcp=True, timeout=0.5, max_bytes=256 << 20)
    try:
        link.send(b"x")  # the server's connection thread now waits in the handler and reads nothing more
        big = np.zeros(64 << 20, np.uint8)  # far more than the two sockets' buffers hold
        start = time.monotonic()
        with pytest.raises(ChannelClosed):
            for _ in range(4):
                link.send(big)
        # each sendmsg that finds no room waits 0.5 s: a few of them at most, never the handler's 30 s
        assert time.monotonic() - start < 10
        assert link.closed
    finally:
        release.set()
        link.close()
        listener.close()


def test_callers_that_are_not_admitted_hold_no_thread_and_no_memory():
    """Over TCP anyone who can reach the port may connect: a caller that says nothing is dropped after the hello
    timeout, a first frame claiming a gigabyte is refused unread, and connections past the limit are closed."""
    listener = SideListener(lambda payload: bytes(payload), tcp=("127.0.0.1", 0), max_connections=3,
                            hello_timeout=0.3, max_bytes=2 << 30)
    host, port = listener.address.rsplit(":", 1)

    def closed_by_server(sock: socket.socket, within: float) -> bool:
        sock.settimeout(within)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    try:
        silent = socket.create_connection((host, int(port)))
        start = time.monotonic()
        assert closed_by_server(silent, 10) and time.monotonic() - start < 5
        huge = socket.create_connection((host, int(port)))
        huge.sendall(struct.pack("<IQB", 1 << 30, 0, 1))  # a HELLO of 1 GiB: over the 4 KiB a token may take
        assert closed_by_server(huge, 10)
        held = [SideLink(listener.address, tcp=True) for _ in range(3)]
        extra = socket.create_connection((host, int(port)))
        assert closed_by_server(extra, 10)
        assert bytes(held[0].receive(held[0].send(b"ok"), 10)) == b"ok"  # the admitted ones go on
        for link in held:
            link.close()
        for sock in (silent, huge, extra):
            sock.close()
    finally:
        listener.close()


def test_an_unreachable_tcp_channel_is_not_dialled_on_every_info_poll(cluster, tiny_checkpoint, monkeypatch):
    """A server whose TCP side port cannot be reached (a firewall): calls go by gRPC, and the gateway tries the
    port again only after TCP_LINK_RETRY, not at every GetInfo poll."""
    from moe_serve.gateway import pool as pool_module

    dials = []
    real = pool_module.SideLink

    def counting(address, **kwargs):
        dials.append(address)
        return real(address, **kwargs)

    monkeypatch.setattr(pool_module, "SideLink", counting)
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    cluster.expert_servicers[server].side.tcp.close()  # the port is announced, nobody listens: refused
    gateway = cluster.gateway(tiny_checkpoint, [server], shared_memory=False, batching=BatchingConfig(batching=False))
    inputs = _forwards_equal_reference(gateway, tiny_checkpoint, (5,))
    pool = _gateway_pool(cluster, gateway)
    wait_for(lambda: dials and not pool.members[0].linking, "the first connect to fail")
    for _ in range(10):  # info polls: each one looks at the side channel again
        cluster.loop.run(pool._refresh_all())
    assert dials == [dials[0]], dials  # one connect, then nothing until TCP_LINK_RETRY has passed
    assert _grpc_computations(cluster, server) >= 2 * len(inputs)


@pytest.mark.parametrize("split", [False, True], ids=["whole calls", "2 pieces a lane"])
def test_a_layer_that_fails_keeps_no_reply_waiting_on_the_other_links(cluster, tiny_checkpoint, monkeypatch, split):
    """The first server refuses its share for good (INVALID_ARGUMENT fails the layer): the other server's reply,
    which nobody will read, is dropped when it comes instead of kept by its link for the link's life. Split into
    2 pieces on each of 2 links, the refused pieces after each link's first are dropped too."""
    from moe_serve.rpc.errors import InvalidArgument

    servers = [cluster.expert_server(tiny_checkpoint, experts=e) for e in ("0-3", "4-7")]
    lanes = {"tcp_lanes": 2, "pieces_per_lane": 2, "min_piece_bytes": 64 * 4} if split else {}
    gateway = cluster.gateway(tiny_checkpoint, servers, shared_memory=False, batching=BatchingConfig(batching=False),
                              **lanes)
    _wait_linked(cluster, gateway, tcp=True)
    members = _gateway_pool(cluster, gateway).members
    wait_for(lambda: all(len(r.side_lanes()) == lanes.get("tcp_lanes", 4) for r in members), "every TCP link",
             timeout=20)

    def refuse(request):
        raise InvalidArgument("refused by the test")

    monkeypatch.setattr(cluster.expert_servicers[servers[0]], "prepare", refuse)
    hidden = np.random.default_rng().standard_normal((16, 64), dtype=np.float32)  # both servers get rows
    with GatewayClient(gateway) as client, pytest.raises(grpc.RpcError) as err:
        client.forward(hidden)
    assert "refused by the test" in err.value.details()
    links = [link for r in _gateway_pool(cluster, gateway).members for link in r.side_lanes()]
    wait_for(lambda: _tcp_calls(cluster, servers[1]) >= 1, "the second server's answer")
    assert all(not link._expected and not link._replies for link in links)  # its sequence number is forgotten
