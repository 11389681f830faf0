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
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch.distributed.rpc as rpc

from benchmarks import rpc_worker
from benchmarks.model import Shape
from moe_client import wire
from moe_client.striping import DEFAULT_LANES, LANE_OPTIONS
from moe_serve.gateway.dispatch import ExpertDispatcher
from moe_serve.gateway.pool import PoolOptions, ServerPool
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.shared_regions import ArenaPool
from tests.support import ROOT
from tests.support.launch import ServiceProcess, launch, stop_all
from tests.support.ports import free_port
from tests.support.threads import LoopThread

MALLOC_DEFAULT: list[str] = []  # ["--malloc-default"] to leave the benchmark's own processes untuned
ENV = {"PYTHONPATH": os.pathsep.join(
    [str(ROOT), str(ROOT / "client"), str(ROOT / "services"), os.environ.get("PYTHONPATH", "")]),
       # torch RPC's own deprecation notice about its Gloo group, once per worker
       "PYTHONWARNINGS": "ignore::UserWarning:torch.distributed.distributed_c10d"}


def bench_loop() -> LoopThread:
    """The gateway's event loop, where its gRPC calls run, on its own thread."""
    return LoopThread("bench-loop", timeout=900.0)


def _python(*args: str, label: str, stdout=subprocess.DEVNULL, wrapper: list[str] = ()) -> ServiceProcess:
    """`python ARGS` with the benchmark's environment, stderr shown here; SIGTERM when the benchmark dies,
    so no 1 GB process outlives a crash. `wrapper` prefixes the command (ip netns exec NAME)."""
    return ServiceProcess([sys.executable, *args], label=label, env=ENV, die_with_parent=True, stdout=stdout,
                          wrapper=wrapper).start()


class GrpcPhase:
    """Expert servers (`moe-expert-server`, one per share of the experts) on unix sockets, and dispatchers."""

    def __init__(self, loop: LoopThread, checkpoint: Path, shape: Shape, workers: int = 2, dtype: str = "float32",
                 threads: int = 1):
        self.loop = loop
        self.dir = tempfile.mkdtemp(prefix="moe-bench-", dir="/tmp")  # short: unix socket paths max ~107 bytes
        # Their startup banners and loading progress go to a log, shown if one fails to start.
        self.procs = [launch("expert-server", Path(self.dir) / f"expert{r}.log", host=f"unix:{self.dir}/expert{r}.sock",
                             env=ENV, die_with_parent=True, checkpoint=checkpoint, experts=shape.owned_by(r, workers),
                             dtype=dtype, torch_threads=threads, name=f"expert{r}", log_level="WARNING")
                      for r in range(1, workers + 1)]
        self.addresses = addresses = [p.address for p in self.procs]
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
        for p in self.procs:  # SERVING, or the log of one that died while loading
            p.wait_ready(900.0)
        self.loop.run(self.pool.start(900.0))

    def dispatcher(self, wire_dtype: int = wire.FLOAT32, shared_memory: bool = False,
                   same_host_calls: bool = False) -> ExpertDispatcher:
        """The gateway's dispatcher over these servers, sending hidden states in `wire_dtype` (or, with
        `shared_memory`, leaving them in /dev/shm arenas as the gateway does for same-host servers, and with
        `same_host_calls` too, calling over the servers' same-host channel instead of gRPC)."""
        arenas = ArenaPool() if shared_memory else None
        if arenas is not None:
            self._arenas.append(arenas)
        return ExpertDispatcher(self.spec, self.pool, self.loop.loop, wire_dtype, 900.0, arenas=arenas,
                                side_calls=same_host_calls)

    def close(self) -> None:
        """Close the channels and stop the servers."""
        for arenas in self._arenas:
            arenas.close()
        self.loop.run(self.pool.close())
        stop_all(self.procs, 60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


WIDE_LANES = 8  # the transport benchmark's wider split: pieces of 1 MiB from 8 MiB on


class EchoPhase:
    """The echo server (benchmarks.echo_server) on a TCP port and a unix socket, and channels to it."""

    def __init__(self, loop: LoopThread):
        from moe_client.channel import insecure_aio_channel, insecure_channel

        self.loop = loop
        self.dir = tempfile.mkdtemp(prefix="moe-bench-", dir="/tmp")
        self.proc = _python("-m", "benchmarks.echo_server", "--unix", f"unix:{self.dir}/echo.sock", *MALLOC_DEFAULT,
                            label="echo server", stdout=subprocess.PIPE)
        line = self.proc.popen.stdout.readline()
        if not line:
            self.proc.stop(60)
            raise RuntimeError("echo server did not start")
        self.addresses = json.loads(line)
        self.side_address = self.addresses.pop("side_tcp")
        self.raw_address = self.addresses.pop("raw_tcp")

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

        async def open_lanes() -> list:
            # the gateway's lanes to one server over TCP: the first channel shared, the rest their own connections
            channels = [self.channels["tcp"], *(insecure_aio_channel(self.addresses["tcp"], LANE_OPTIONS)
                                                for _ in range(DEFAULT_LANES - 1))]
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 60)
            return channels

        self.lane_channels = loop.run(open_lanes())
        self.sync_channels = {kind: insecure_channel(address) for kind, address in self.addresses.items()}
        from moe_serve.rpc.side_channel import SideLink

        # The gateway's TCP side links to one server (--tcp-lanes, default 4): large calls are split by rows
        # over them; WIDE_LANES of them for the wider variant.
        self.side_links = [SideLink(self.side_address, tcp=True, max_bytes=1 << 30) for _ in range(WIDE_LANES)]
        self.raw_link = SideLink(self.raw_address, tcp=True, max_bytes=1 << 30)

    def close(self) -> None:
        """Close the channels and stop the server."""
        async def close_channels() -> None:
            await asyncio.gather(*(c.close() for c in [*self.channels.values(), *self.split_channels,
                                                       *self.lane_channels[1:]]))

        for channel in self.sync_channels.values():
            channel.close()
        for link in [*self.side_links, self.raw_link]:
            link.close()

        self.loop.run(close_channels())
        self.proc.stop(60)
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
        self.procs = [_python(*a, label=f"rpc worker {r}") for r, a in enumerate(args, 1)]
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
                if not p.alive:
                    print(f"benchmark {p.label} exited with {p.returncode} while starting", file=sys.stderr)
                    os._exit(1)
            threading.Event().wait(0.5)

    def close(self) -> None:
        """Leave the group and stop the workers.

        Not a graceful shutdown: that synchronises every rank through per-process state that fresh
        workers in a later phase do not share, and hangs. Every call has been waited for by now.
        """
        rpc.shutdown(graceful=False)
        stop_all(self.procs, 60)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
