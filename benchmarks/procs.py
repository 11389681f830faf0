"""The processes a benchmark phase needs, started and stopped around it.

A phase runs one transport only: TensorPipe's shared-memory reactor busy-polls (about a sixth of a
core per process here, even idle), so torch RPC agents alive while gRPC is timed would tax ours
with the CPU they burn, and the reverse holds for idle gRPC servers. Each phase therefore starts
its own processes and stops them: gRPC phases run the real `moe-expert-server` (or the echo
server), torch RPC phases run benchmarks.rpc_worker under a fresh RPC group with this process as
master.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch.distributed.rpc as rpc

from benchmarks import rpc_worker
from benchmarks.model import Shape
from moe_client import wire
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.gateway.pool import PoolOptions, ServerPool
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.shared_regions import ArenaPool

ROOT = Path(__file__).resolve().parent.parent
MALLOC_DEFAULT: list[str] = []  # ["--malloc-default"] to leave the benchmark's own processes untuned
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT), str(ROOT / "client"), str(ROOT / "services"), os.environ.get("PYTHONPATH", "")]),
       # torch RPC's own deprecation notice about its Gloo group, once per worker
       "PYTHONWARNINGS": "ignore::UserWarning:torch.distributed.distributed_c10d"}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopThread:
    """An asyncio loop on its own thread: the gateway's event loop, where its gRPC calls run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 900.0):
        """Run a coroutine on the loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# SIGTERM each child when the benchmark dies, so no 1 GB expert server outlives a crash. setpriv rather
# than a preexec_fn: that would make Python fork() this gRPC-threaded, gigabyte process.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "SIGTERM", "--"] if shutil.which("setpriv") else []


def _spawn(args: list[str], stdout=subprocess.DEVNULL, stderr=None) -> subprocess.Popen:
    return subprocess.Popen([*_DIE_WITH_PARENT, sys.executable, *args], env=ENV, stdout=stdout, stderr=stderr,
                            text=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class GrpcPhase:
    """Expert servers (`moe-expert-server`, one per share of the experts) on unix sockets, and dispatchers."""

    def __init__(self, loop: LoopThread, checkpoint: Path, shape: Shape, workers: int = 2, dtype: str = "float32",
                 threads: int = 1):
        self.loop = loop
        self.dir = tempfile.mkdtemp(prefix="moe-bench-", dir="/tmp")  # short: unix socket paths max ~107 bytes
        self.addresses = addresses = [f"unix:{self.dir}/expert{r}.sock" for r in range(1, workers + 1)]
        # Their startup banners and loading progress go to a log, shown if one fails to start.
        self.logs = [Path(self.dir) / f"expert{r}.log" for r in range(1, workers + 1)]
        self.procs = [_spawn(["-m", "moe_serve.expert_server.main", "--checkpoint", str(checkpoint),
                              "--experts", shape.owned_by(r, workers), "--host", address, "--dtype", dtype,
                              "--torch-threads", str(threads), "--name", f"expert{r}", "--log-level", "WARNING"],
                             stderr=log.open("w"))
                      for r, (address, log) in enumerate(zip(addresses, self.logs, strict=True), 1)]
        ckpt = Checkpoint(checkpoint)
        self.spec = ckpt.spec
        self._arenas: list[ArenaPool] = []
        # The gateway's replica pool over these servers (one replica per expert share, so no failover here).
        self.pool = ServerPool(addresses, self.spec, ckpt.fingerprint(), PoolOptions(rpc_timeout=900.0))
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> None:
        future = asyncio.run_coroutine_threadsafe(self.pool.start(900.0), self.loop.loop)
        while not future.done():  # the pool waits for servers still loading; one that died never comes
            dead = [(p.returncode, log) for p, log in zip(self.procs, self.logs, strict=True) if p.poll() is not None]
            if dead:
                future.cancel()
                code, log = dead[0]
                raise RuntimeError(f"expert server exited with {code} while starting:\n{log.read_text()[-3000:]}")
            threading.Event().wait(0.2)
        future.result()

    def dispatcher(self, wire_dtype: int = wire.FLOAT32, shared_memory: bool = False) -> ExpertDispatcher:
        """The gateway's dispatcher over these servers, sending hidden states in `wire_dtype` (or, with
        `shared_memory`, leaving them in /dev/shm arenas as the gateway does for same-host servers)."""
        arenas = ArenaPool() if shared_memory else None
        if arenas is not None:
            self._arenas.append(arenas)
        return ExpertDispatcher(self.spec, self.pool, self.loop.loop, wire_dtype, 900.0, arenas=arenas)

    def close(self) -> None:
        """Close the channels and stop the servers."""
        for arenas in self._arenas:
            arenas.close()
        self.loop.run(self.pool.close())
        _stop(self.procs)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EchoPhase:
    """The echo server (benchmarks.echo_server) on a TCP port and a unix socket, and channels to it."""

    def __init__(self, loop: LoopThread):
        from moe_client.channel import insecure_aio_channel, insecure_channel

        self.loop = loop
        self.dir = tempfile.mkdtemp(prefix="moe-bench-", dir="/tmp")
        self.proc = _spawn(["-m", "benchmarks.echo_server", "--unix", f"unix:{self.dir}/echo.sock", *MALLOC_DEFAULT],
                           stdout=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if not line:
            _stop([self.proc])
            raise RuntimeError("echo server did not start")
        self.addresses = json.loads(line)

        async def open_channels() -> dict:
            channels = {kind: insecure_aio_channel(address) for kind, address in self.addresses.items()}
            for channel in channels.values():
                await asyncio.wait_for(channel.channel_ready(), 60)
            return channels

        self.channels = loop.run(open_channels())

        async def open_split() -> list:
            # separate connections: a channel per local subchannel pool
            channels = [insecure_aio_channel(self.addresses["unix"], [("grpc.use_local_subchannel_pool", 1)])
                        for _ in range(2)]
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 60)
            return channels

        self.split_channels = loop.run(open_split())
        self.sync_channels = {kind: insecure_channel(address) for kind, address in self.addresses.items()}

    def close(self) -> None:
        """Close the channels and stop the server."""
        async def close_channels() -> None:
            await asyncio.gather(*(c.close() for c in [*self.channels.values(), *self.split_channels]))

        for channel in self.sync_channels.values():
            channel.close()

        self.loop.run(close_channels())
        _stop([self.proc])
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RpcPhase:
    """A torch RPC group: this process as master, workers holding the experts' shares (or none, for echo)."""

    def __init__(self, workers: int, checkpoint: Path | None = None, shape: Shape | None = None,
                 dtype: str = "float32", threads: int = 1, tcp_only: bool = False):
        init = f"tcp://127.0.0.1:{free_port()}"
        # torch RPC keeps per-process state across groups: init_rpc prefixes its store keys with a count of
        # past inits (fresh workers must use ours), and its all-gather numbers rounds per set of names (so
        # each group gets new names).
        generation = str(rpc._init_counter)
        self.names = [f"worker{r}-{generation}" for r in range(1, workers + 1)]
        args = []
        for r in range(1, workers + 1):
            extra = ["--checkpoint", str(checkpoint), "--experts", shape.owned_by(r, workers)] if checkpoint else []
            args.append(["-m", "benchmarks.rpc_worker", "--rank", str(r), "--world-size", str(workers + 1),
                         "--init-method", init, "--threads", str(threads), "--dtype", dtype,
                         "--generation", generation, *(["--tcp-only"] if tcp_only else []), *MALLOC_DEFAULT, *extra])
        self.procs = [_spawn(a) for a in args]
        self._starting = True
        threading.Thread(target=self._watchdog, daemon=True).start()
        options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=900, init_method=init,
                                                  **(rpc_worker.TCP_ONLY if tcp_only else {}))
        rpc.init_rpc("master", rank=0, world_size=workers + 1, rpc_backend_options=options)
        self._starting = False

    def _watchdog(self) -> None:
        # init_rpc waits for every rank: a worker dying while loading would hang it forever.
        while self._starting:
            for p in self.procs:
                if p.poll() is not None:
                    print(f"benchmark rpc worker exited with {p.returncode} while starting", file=sys.stderr)
                    os._exit(1)
            threading.Event().wait(0.5)

    def close(self) -> None:
        """Leave the group and stop the workers.

        Not a graceful shutdown: that synchronises every rank through per-process state that fresh
        workers in a later phase do not share, and hangs. Every call has been waited for by now.
        """
        rpc.shutdown(graceful=False)
        _stop(self.procs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
