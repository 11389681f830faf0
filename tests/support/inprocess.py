"""Expert servers and gateways inside the test process, on a LoopThread: what the `cluster` fixture gives."""

from __future__ import annotations

from pathlib import Path

from moe_serve.expert_server.config import ExpertServerConfig
from moe_serve.expert_server.main import create_server
from moe_serve.gateway.config import GatewayConfig
from moe_serve.gateway.main import create_gateway
from tests.support.threads import LoopThread


class Cluster:
    """Starts expert servers and gateways (port 0 unless told) and stops them all at stop()."""

    def __init__(self, loop: LoopThread):
        self.loop = loop
        self.handles = []
        self.by_address = {}  # address -> ServerHandle
        self.servicers = {}  # address -> its servicer, to reach a gateway's engine or a server's executor
        self.expert_servicers = {}  # expert server address -> its ExpertServicer

    def _keep(self, address: str, handle, servicer) -> str:
        self.handles.append(handle)
        self.by_address[address] = handle
        self.servicers[address] = servicer
        return address

    def expert_server(self, checkpoint: Path, experts=None, devices: str = "cpu", dtype: str = "float32",
                      name: str = "", host: str = "127.0.0.1", port: int = 0, **overrides) -> str:
        """Start one expert server; returns its host:port address."""
        config = ExpertServerConfig(checkpoint=str(checkpoint), experts=experts, devices=devices, dtype=dtype,
                                    host=host, port=port, name=name, **overrides)
        handle, servicer = self.loop.run(create_server(config))
        self.expert_servicers[f"{host}:{handle.port}"] = servicer
        return self._keep(f"{host}:{handle.port}", handle, servicer)

    def gateway(self, checkpoint: Path, servers: list[str], **overrides) -> str:
        """Start a gateway over `servers`; returns its address."""
        options = {"connect_timeout": 20.0, **overrides}
        config = GatewayConfig(checkpoint=str(checkpoint), servers=servers, host="127.0.0.1", port=0, **options)
        handle, servicer = self.loop.run(create_gateway(config))
        return self._keep(f"127.0.0.1:{handle.port}", handle, servicer)

    def handle(self, address: str):
        """The ServerHandle of the server at `address`."""
        return self.by_address[address]

    def detach(self, address: str):
        """Forget the server at `address` (the caller stops it); returns its ServerHandle."""
        handle = self.by_address.pop(address)
        self.servicers.pop(address)
        self.handles.remove(handle)
        return handle

    def stop_one(self, address: str, grace: float = 0) -> None:
        """Stop one server now, as a crash (grace 0) or a graceful stop would."""
        self.loop.run(self.detach(address).stop(grace))

    def stop(self) -> None:
        for handle in reversed(self.handles):
            self.loop.run(handle.stop(0))
        self.handles.clear()
        self.by_address.clear()
        self.servicers.clear()
