"""Tail frames (rpc/frames.py): a reply's bulk lands in the buffer its caller named, and nowhere else.

Real listeners and links on loopback TCP; fresh random bytes each run; destinations poisoned first, so a
byte that did not land (or landed where it must not) shows."""

import threading
import time

import grpc
import numpy as np
import pytest

from moe_serve.rpc.side_channel import ChannelError, SideLink, SideListener, Tailed, TailReply

_POISON = 0xA5


def _tail_echo(payload: memoryview) -> Tailed:
    """Answers a head naming the payload's size and the payload as the tail (whole: the two joined)."""
    head = f"{len(payload)}:".encode()
    return Tailed(head, payload, [head, payload])


def _poisoned(size: int) -> np.ndarray:
    return np.full(size, _POISON, np.uint8)


@pytest.fixture
def tcp_link():
    listener = SideListener(_tail_echo, tcp=("127.0.0.1", 0))
    link = SideLink(listener.address, tcp=True)
    yield link
    link.close()
    listener.close()


def _payload(rng) -> np.ndarray:
    return rng.integers(0, 256, int(rng.integers(1, 3 << 20)), dtype=np.uint8)


def test_a_tail_lands_in_the_callers_buffer_and_a_plain_request_gets_the_whole_reply(tcp_link):
    rng = np.random.default_rng()
    payload = _payload(rng)
    into = _poisoned(payload.nbytes)
    assert tcp_link.tails
    reply = tcp_link.receive(tcp_link.send(memoryview(payload), into=memoryview(into)), 10)
    assert isinstance(reply, TailReply) and reply.landed
    assert bytes(reply.head) == f"{payload.nbytes}:".encode()
    assert np.shares_memory(np.frombuffer(reply.tail, np.uint8), into)
    assert np.array_equal(into, payload)
    whole = tcp_link.receive(tcp_link.send(memoryview(payload)), 10)  # no destination: the whole message
    assert bytes(whole) == f"{payload.nbytes}:".encode() + payload.tobytes()


def test_a_destination_of_another_size_is_left_alone(tcp_link):
    rng = np.random.default_rng()
    payload = _payload(rng)
    into = _poisoned(payload.nbytes + int(rng.integers(1, 64)))
    reply = tcp_link.receive(tcp_link.send(memoryview(payload), into=memoryview(into)), 10)
    assert isinstance(reply, TailReply) and not reply.landed
    assert bytes(reply.tail) == payload.tobytes()
    assert (into == _POISON).all()


def test_a_listener_without_tails_answers_whole_and_writes_nowhere():
    listener = SideListener(_tail_echo, tcp=("127.0.0.1", 0), tails=False)
    link = SideLink(listener.address, tcp=True)
    try:
        payload = _payload(np.random.default_rng())
        into = _poisoned(payload.nbytes)
        assert not link.tails
        reply = link.receive(link.send(memoryview(payload), into=memoryview(into)), 10)
        assert bytes(reply) == f"{payload.nbytes}:".encode() + payload.tobytes()
        assert (into == _POISON).all()
    finally:
        link.close()
        listener.close()


def _slow_tail_echo(payload: memoryview) -> Tailed:
    time.sleep(0.3)
    return _tail_echo(payload)


@pytest.mark.parametrize("how", ["forgotten", "timed out"])
def test_a_call_given_up_on_never_writes_its_destination(how):
    """Its reply still comes, after the caller gave up: it is read and dropped, and the buffer (which the caller
    may reuse) keeps what it had."""
    listener = SideListener(_slow_tail_echo, tcp=("127.0.0.1", 0))
    link = SideLink(listener.address, tcp=True)
    try:
        rng = np.random.default_rng()
        payload = _payload(rng)
        into = _poisoned(payload.nbytes)
        seq = link.send(memoryview(payload), into=memoryview(into))
        if how == "forgotten":
            link.forget(seq)
        else:
            with pytest.raises(TimeoutError):
                link.receive(seq, 0.05)
        after = _payload(rng)
        reply = link.receive(link.send(memoryview(after)), 10)  # read after the late one, which is dropped
        assert bytes(reply) == f"{after.nbytes}:".encode() + after.tobytes()
        assert (into == _POISON).all()
    finally:
        link.close()
        listener.close()


def test_an_error_answers_a_tail_request_as_any_other_and_writes_nowhere():
    def refuse(payload):  # 16-byte payloads only
        if len(payload) == 16:
            raise ChannelError(grpc.StatusCode.INVALID_ARGUMENT, f"payload of {len(payload)} bytes refused")
        return _tail_echo(payload)

    listener = SideListener(refuse, tcp=("127.0.0.1", 0))
    link = SideLink(listener.address, tcp=True)
    try:
        into = _poisoned(16)
        with pytest.raises(ChannelError) as err:
            link.receive(link.send(b"x" * 16, into=memoryview(into)), 10)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "16 bytes" in err.value.details
        assert (into == _POISON).all()
        payload = _payload(np.random.default_rng())  # the link goes on
        into = _poisoned(payload.nbytes)
        assert link.receive(link.send(memoryview(payload), into=memoryview(into)), 10).landed
        assert np.array_equal(into, payload)
    finally:
        link.close()
        listener.close()


def test_two_threads_land_their_replies_in_their_own_buffers(tcp_link):
    """Replies read by whichever thread holds the socket land in the buffer of the call they answer."""
    rng = np.random.default_rng()
    payloads = [_payload(rng) for _ in range(6)]
    intos = [_poisoned(p.nbytes) for p in payloads]
    errors = []

    def call(i):
        try:
            reply = tcp_link.receive(tcp_link.send(memoryview(payloads[i]), into=memoryview(intos[i])), 20)
            assert reply.landed
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert all(np.array_equal(into, p) for into, p in zip(intos, payloads, strict=True))


@pytest.mark.parametrize("head_bytes", [0, 600, 5000], ids=["no head", "head past the first read", "long head"])
def test_heads_and_tails_of_any_size_are_read_whole(head_bytes):
    """Heads from none to longer than what is read with them, tails from one byte (all of it read with the head)
    to more than a MiB, into the caller's buffer."""
    rng = np.random.default_rng()
    head = rng.integers(0, 256, head_bytes, dtype=np.uint8).tobytes()
    listener = SideListener(lambda payload: Tailed(head, payload, [head, payload]), tcp=("127.0.0.1", 0))
    link = SideLink(listener.address, tcp=True)
    try:
        for size in (1, int(rng.integers(2, 600)), int(rng.integers(600, 2 << 20))):
            payload = rng.integers(0, 256, size, dtype=np.uint8)
            into = _poisoned(size)
            reply = link.receive(link.send(memoryview(payload), into=memoryview(into)), 10)
            assert reply.landed and bytes(reply.head) == head
            assert np.array_equal(into, payload)
    finally:
        link.close()
        listener.close()
