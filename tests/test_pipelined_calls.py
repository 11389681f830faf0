"""Device-routed calls the model thread does not wait for (gateway/pipelined_calls.py): the GPU waits for a word
the server sets (rpc/stream_signals.py). The GPU tests run real expert server processes on cuda:0 (the lent GPU
runs); on the CPU, the pieces that do not need a GPU: the request's done fields, the side channel's look at
replies nobody waits for yet, and the server's checks of shared_done."""

import signal
import socket
import threading
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from moe_client import wire, zerocopy
from moe_client.pb import experts_pb2
from moe_serve.core.routing import route
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.gateway.pipelined_calls import WORDS, DoneWords, PendingCalls, Word
from moe_serve.gateway.pool import ServerPool
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc import stream_signals
from moe_serve.rpc.errors import ServiceError, Unavailable
from moe_serve.rpc.shared_regions import ArenaPool
from moe_serve.rpc.side_channel import ChannelError, SideLink, SideListener
from tests.support.launch import gpu_expert_servers
from tests.support.references import plain_torch

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="stream memory operations need a GPU (lent GPU runs)")


def test_done_fields_parse_after_the_cached_request():
    """The per-call done_index and done_value, appended to the rest of a request, parse as its fields."""
    rng = np.random.default_rng()
    index, value = int(rng.integers(0, WORDS)), int(rng.integers(1, 1 << 31))
    body = experts_pb2.RunExpertsRequest(layer=3, experts=[1, 2]).SerializeToString()
    word = experts_pb2.RunExpertsRequest(done_index=index, done_value=value).SerializeToString()
    parsed = zerocopy.RunExpertsRequest.FromString(body + word)
    assert (parsed.layer, list(parsed.experts), parsed.done_index, parsed.done_value) == (3, [1, 2], index, value)


def test_a_watcher_sees_error_replies_and_a_closed_channel_without_taking_replies():
    """SideLink.poll reads what is in the socket for the callers (their replies stay theirs); failed() says which
    calls failed, and, once the peer has gone, that every call still unanswered did."""
    def handler(payload):
        if bytes(payload) == b"bad":
            raise ChannelError(grpc.StatusCode.NOT_FOUND, "no such expert")
        return bytes(payload)

    listener = SideListener(handler)
    link = SideLink(listener.address)
    try:
        good, bad = link.send(b"good"), link.send(b"bad")
        deadline = time.monotonic() + 10
        while not link.failed(bad) and time.monotonic() < deadline:
            link.poll()
        assert link.failed(bad) and not link.failed(good)
        assert bytes(link.receive(good, 5)) == b"good"  # polled, still the caller's
        with pytest.raises(ChannelError):
            link.receive(bad, 5)
        pending = link.send(b"good")
        listener.close(5)
        while not link.closed and time.monotonic() < deadline:
            link.poll()
        assert link.failed(pending) or bytes(link.receive(pending, 5)) == b"good"  # answered before it closed
    finally:
        link.close()
        listener.close(5)


class _Round:
    """What the watchdog looks at in a round: its parts, and whether each is past its time."""

    def __init__(self, parts, late: set):
        self.parts, self.late, self.layer = parts, late, 0

    def overdue(self, part) -> bool:
        return id(part) in self.late


def _part(link: SideLink, payload: bytes, index: int):
    piece = SimpleNamespace(link=link, seq=link.send(payload), send_error="")
    return SimpleNamespace(pieces=[piece], rescued=False, settling=False, result=torch.empty(0),
                           word=Word(index, 1, 0))


class _Settled:
    """A round as the model thread reads it: its layer, and its reply failing or not."""

    def __init__(self, layer: int, error: str = "", read: list | None = None):
        self.layer, self.error, self.read, self.parts = layer, error, read, []

    def settle(self, pending) -> None:
        self.read.append(self)
        if self.error:
            raise Unavailable(self.error)


def test_a_stopped_forwards_unread_calls_are_read_at_the_next_forward_without_failing_it(caplog):
    """A forward that raised before its last MoE layer leaves its calls unread; the thread's next forward (a
    call of the first MoE layer) reads them, their arenas go back, and a failure among them is logged, not
    raised there. A forward's own failed call fails it a few layers later (at most `depth`), once every call it
    made is read."""
    rng = np.random.default_rng()
    last = int(rng.integers(4, 8))
    pending = PendingCalls(last_layer=last, depth=3, first_layer=0)
    read: list = []
    try:
        failed_at = int(rng.integers(0, 3))
        stopped = [_Settled(layer, "peer gone" if layer == failed_at else "", read) for layer in range(3)]
        for round_ in stopped:  # three calls, none read yet (depth 3); then the forward raises elsewhere
            pending._join(round_)
        assert not read
        fresh = [_Settled(layer, read=read) for layer in range(last + 1)]
        pending._join(fresh[0])  # the next forward: the stopped one's calls are read first, none raises
        assert read == stopped and "peer gone" in caplog.text
        for round_ in fresh[1:]:
            pending._join(round_)
        assert read == stopped + fresh and not pending._mine()
        bad = [_Settled(layer, "layer 2 lost" if layer == 2 else "", read) for layer in range(last + 1)]
        joined = []
        with pytest.raises(Unavailable, match="layer 2 lost"):
            for round_ in bad:
                joined.append(round_)
                pending._join(round_)
        assert read[-len(joined):] == joined and not pending._mine()  # every call read before the error went up
        assert len(joined) <= 2 + 1 + pending.depth
    finally:
        pending.close()


def test_the_watchdog_sets_the_words_of_calls_that_will_not_answer_and_no_others(monkeypatch):
    """Real side channels, the GPU write recorded: an error reply, a silent server past its time and a closed
    channel get their words set; an answered call does not, even past its time and unread; nor does a silent
    call the model thread is reading (it sets the word itself if the read fails)."""
    release = threading.Event()

    def handler(payload):
        if bytes(payload) == b"bad":
            raise ChannelError(grpc.StatusCode.INTERNAL, "boom")
        if bytes(payload) == b"silent":
            release.wait(30)
        return bytes(payload)

    listeners = [SideListener(handler) for _ in range(5)]
    links = [SideLink(listener.address) for listener in listeners]
    pending = PendingCalls(last_layer=1)
    written = []
    monkeypatch.setattr(pending, "_set", lambda device, word: written.append(word.index))
    try:
        answered, bad, silent, settling, closed = (_part(link, payload, i) for i, (link, payload) in enumerate(
            zip(links, (b"good", b"bad", b"silent", b"silent", b"silent"), strict=True)))
        settling.settling = True
        pending._mine().append(_Round([answered, bad, silent, settling, closed],
                                      late={id(answered), id(silent), id(settling)}))
        for conn in list(listeners[4]._conns):  # the server's end goes while its call is being answered
            conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 10
        while not links[0].replied(answered.pieces[0].seq) and time.monotonic() < deadline:
            links[0].poll()  # answered before the watchdog's first look: then past its time, but not late
        pending._start_watchdog()
        while len(written) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # a few more looks: nothing else is set
        assert sorted(written) == [1, 2, 4] and pending.rescued == 3
        assert bytes(links[0].receive(answered.pieces[0].seq, 5)) == b"good"  # the watchdog left it to its caller
    finally:
        release.set()
        pending.close()
        for link in links:
            link.close()
        for listener in listeners:
            listener.close(5)


def test_servers_check_shared_done(cluster, tiny_checkpoint):
    """A done word only goes with a device-routed call that waits on the caller's event; a CPU server says it
    sets none."""
    server = cluster.expert_server(tiny_checkpoint, experts="0-7")
    servicer = cluster.expert_servicers[server]
    assert not servicer.info.done_signals
    link = SideLink(servicer.side.address)
    words = ArenaPool().acquire("x", torch.device("cpu"), 1 << 12)
    t, k = 4, 2
    done = words.message(3072, wire.INT32, (16, 1))
    routed = {"shared_hidden": words.message(0, wire.FLOAT32, (t, 64)),
              "shared_expert_ids": words.message(1024, wire.INT64, (t, k)),
              "shared_weights": words.message(1280, wire.FLOAT32, (t, k)),
              "shared_output": words.message(2048, wire.FLOAT32, (t, 64))}
    cases = [
        (zerocopy.RunExpertsRequest(layer=0, shared_done=done, done_index=1, done_value=1), "shared_expert_ids"),
        (zerocopy.RunExpertsRequest(layer=0, experts=[1], shared_done=done, **routed), "shared_done"),
    ]
    try:
        for request, named in cases:
            with pytest.raises(ChannelError) as err:
                link.receive(link.send(request._type.chunks(request)[0]), 10)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and named in err.value.details, err.value
    finally:
        link.close()
        words.close()


def test_no_stream_signals_off_a_gpu():
    assert not stream_signals.available(torch.device("cpu"))


@GPU
def test_a_stream_waits_for_the_word():
    """The default stream waits for the word, then copies x: it is still busy while the host sleeps, and free once
    another stream sets the word; the copy then holds x."""
    device = torch.device("cuda", 0)
    assert stream_signals.available(device)
    words = DoneWords(device)
    word = words.take()
    x = torch.from_numpy(np.random.default_rng().standard_normal(1 << 16, dtype=np.float32)).to(device)
    y = torch.zeros_like(x)
    torch.cuda.synchronize(device)
    stream = torch.cuda.default_stream(device)
    stream_signals.wait_at_least(stream, word.address, word.value)
    y.copy_(x)
    time.sleep(0.05)
    assert not stream.query()  # waiting on the GPU
    stream_signals.write(torch.cuda.Stream(device), word.address, word.value)
    assert _synchronises_within(10.0)
    assert torch.equal(y, x)
    after = words.take()
    assert (after.index, after.value) == (1, 1)  # one word a call, the first lap


def _gpu_dispatcher(processes, loop_thread, checkpoint_dir, tmp_path, timeout: float = 60.0):
    servers = gpu_expert_servers(processes, checkpoint_dir, tmp_path, "float32")
    checkpoint = Checkpoint(checkpoint_dir)
    pool = ServerPool([s.address for s in servers], checkpoint.spec, checkpoint.fingerprint())
    loop_thread.run(pool.start(60))
    dispatcher = ExpertDispatcher(checkpoint.spec, pool, loop_thread.loop, wire.FLOAT32, timeout=timeout,
                                  arenas=ArenaPool())
    return servers, pool, dispatcher


def _routing(tokens: int):
    weights, ids = route(torch.randn(tokens, 8), 2, True)
    return torch.randn(tokens, 64), ids, weights


@GPU
def test_calls_not_waited_for_equal_the_reference(processes, loop_thread, tiny_checkpoint, tmp_path):
    """Chains of MoE calls (layer 0, 1, 0, 1, ...; each one's input the last one's output) go unwaited: the host
    queues them all, and each sum equals the checkpoint's experts. The replies are all read at the last MoE layer."""
    _servers, pool, dispatcher = _gpu_dispatcher(processes, loop_thread, tiny_checkpoint, tmp_path)
    try:
        assert all(r.done_signals for r in pool.members)
        for tokens in (1, 9, 9, 130):
            hidden, ids, weights = _routing(tokens)
            inputs, outputs = [], []
            x = hidden.cuda()
            for layer in (0, 1, 0, 1, 0, 1):
                round_ = dispatcher.submit(layer, x, ids.cuda(), weights.cuda())
                assert round_.pipelined
                inputs.append(x)
                x = round_.result() / 4  # the next call's input: only the GPU knows it yet
                outputs.append(x * 4)
            assert not dispatcher.pending._mine()  # read at the last MoE layer
            for layer, (x, out) in enumerate(zip(inputs, outputs, strict=True)):
                want = plain_torch(tiny_checkpoint, layer % 2, x.cpu().numpy(), ids.numpy(), weights.numpy())
                assert np.abs(out.cpu().numpy() - want).max() <= 1e-4
        assert all(r.outstanding == 0 for r in pool.members) and dispatcher.pending.rescued == 0
    finally:
        dispatcher.close()
        loop_thread.run(pool.close())


def _synchronises_within(seconds: float) -> bool:
    done = threading.Event()
    threading.Thread(target=lambda: (torch.cuda.synchronize(), done.set()), daemon=True).start()
    return done.wait(seconds)


@GPU
@pytest.mark.parametrize("how", ["killed", "silent"])
def test_a_server_lost_under_unwaited_calls_frees_the_gpu_and_fails_the_forward(processes, loop_thread,
                                                                                 tiny_checkpoint, tmp_path, how):
    """A server stopped (SIGSTOP) before it reads our calls: our stream waits for words it will not set. Killed
    then, the watchdog sees the channel close and sets them; left silent, it sets them once the calls are past
    their time (here 3 s). Either way the GPU is free again (a synchronisation returns) and the layer's reply, read
    at the last MoE layer, fails it with the server named."""
    servers, pool, dispatcher = _gpu_dispatcher(processes, loop_thread, tiny_checkpoint, tmp_path,
                                                timeout=3.0 if how == "silent" else 60.0)
    try:
        hidden, ids, weights = _routing(9)
        x = dispatcher.submit(0, hidden.cuda(), ids.cuda(), weights.cuda()).result()  # a good call first
        dispatcher.pending.settle()  # its replies read: the server stopped next has answered it
        torch.cuda.synchronize()
        servers[1].signal(signal.SIGSTOP)
        round_ = dispatcher.submit(0, x, ids.cuda(), weights.cuda())
        assert round_.pipelined
        round_.result()
        if how == "killed":
            servers[1].kill()
        assert _synchronises_within(2.0 if how == "killed" else 30.0)
        with pytest.raises(ServiceError) as err:
            dispatcher.pending.settle()
        assert servers[1].address in str(err.value) and servers[0].address not in str(err.value), err.value
        assert dispatcher.pending.rescued == 1  # the server that answered in time is not blamed
    finally:
        servers[1].signal(signal.SIGCONT)
        dispatcher.close()
        loop_thread.run(pool.close())
