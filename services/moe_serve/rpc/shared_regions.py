"""Same-host fast path: tensors left in memory the gateway shares with an expert server, not in messages.

When a gateway and an expert server run on one host, RunExperts can carry, instead of the hidden
states' bytes, a SharedTensor naming where they are: a POSIX shared-memory object (host tensors) or a
GPU allocation exported by CUDA IPC (tensors on a GPU, which a server on another GPU of the host
reads over NVLink/PCIe peer access). The server writes its result into the same kind of region and
the reply carries only its dtype and shape. gRPC still carries the call, its ids, weights, deadline
and errors; only the bulk bytes skip the sockets, the encoding and the host copies.

Gateway side: `ArenaPool` hands out regions ("arenas") big enough for a call's input and output and
takes them back after the reply, so a region is exported once and reused call after call.
Server side: `RegionMaps` maps each region once (kept mapped, least recently used dropped first) and
views tensors in it, checking every field against the region.

A /dev/shm object is mode 0600, but its name is visible to everyone on the host, and anyone may make a
file or symlink there. So an expert server opens only regular files of its own user, never through a
symlink, and each region begins with a random key that only its gateway and the server (once it has
mapped it) know; a request must carry it. Any refusal is one FAILED_PRECONDITION (shm_files.py), so
the answers tell nothing about other files. A CUDA IPC handle is itself an unguessable secret, sent
only in requests.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import secrets
import socket
import threading
from collections import OrderedDict
from functools import cache
from pathlib import Path

import torch

from moe_client import wire, zerocopy
from moe_client.pb import experts_pb2
from moe_serve.rpc import shm_files
from moe_serve.rpc.codec import TORCH_DTYPES
from moe_serve.rpc.errors import FailedPrecondition, InvalidArgument
from moe_serve.rpc.gpu_events import current_stream, ipc_event

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "moe-"
_SHM_NAME = re.compile(r"^moe-[A-Za-z0-9_-]{1,64}$")  # only regions made by ArenaPool: no other /dev/shm object
_ALIGN = 256  # byte alignment of tensors inside an arena
_KEY_BYTES = 16
_SHM_HEADER = _ALIGN  # a shm arena's key, then tensors from here
_MIN_ARENA = 1 << 20
_VIEWS_PER_REGION = 64  # views (and messages) kept per region: a caller places a few tensors per arena
SHARED_DTYPES = (wire.FLOAT32, wire.BFLOAT16, wire.FLOAT16)
SHM, CUDA = experts_pb2.REGION_KIND_SHM, experts_pb2.REGION_KIND_CUDA  # the RegionKind values
KIND_NAMES = {SHM: "shm", CUDA: "cuda"}  # as logs and messages name them


def kind_names(kinds) -> list[str]:
    """RegionKind values -> ['cuda', 'shm'], sorted (an unknown value as its number)."""
    return sorted(KIND_NAMES.get(k, str(k)) for k in kinds)


@cache
def host_id() -> str:
    """This host's identity: host name and kernel boot id (containers on one kernel differ by host name)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def gpu_uuid(device: torch.device) -> str:
    """'GPU-...' as nvidia-smi names the card: the same string in every process, whatever its numbering."""
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def local_kinds() -> list[int]:
    """The region kinds this process can map: SHM where /dev/shm exists, CUDA where a GPU is visible."""
    kinds = [SHM] if SHM_DIR.is_dir() else []
    if torch.cuda.is_available():
        kinds.append(CUDA)
    return kinds


def local_gpu_uuids() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [gpu_uuid(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]


def kind_for(device: torch.device) -> int:
    return CUDA if device.type == "cuda" else SHM


class Arena:
    """One exported region on `device` with `nbytes` for tensors, and the SharedRegion message that names it.

    Offsets given to view() and message() count from the first byte for tensors (after a shm arena's key).
    """

    def __init__(self, device: torch.device, nbytes: int):
        self.device = device
        self.nbytes = nbytes
        # GPU arenas: recorded on the releasing thread's stream (ArenaPool.release); the next user, maybe on
        # another stream (two micro-batches share the pool), waits on it before writing (ArenaPool.acquire)
        self.last_read: torch.cuda.Event | None = None
        self.read_on = 0  # ... and the stream it was recorded on: a user on that same stream need not wait for it
        self._path: Path | None = None
        # Views and messages by (offset, dtype, shape): made once, as the arena is reused call after call
        self._views: dict[tuple, torch.Tensor] = {}
        self._messages: dict[tuple, object] = {}
        self.derived: dict = {}  # what a caller derives from the places it uses (a request naming them): remember()
        self._event: tuple[torch.cuda.Event, bytes] | None = None  # record_event(): made on first use
        if device.type == "cuda":
            self._start = 0
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
            # torch's CUDA IPC export (what torch.multiprocessing sends): the allocation's handle, this
            # storage's offset in it, and a shared reference counter the mapping process holds a count on.
            (_, handle, size, offset, ref_counter, ref_offset, _, _) = self.buffer.untyped_storage()._share_cuda_()
            self.region = zerocopy.SharedRegion(kind=CUDA, size=size, device_uuid=gpu_uuid(device),
                                                cuda_handle=handle, cuda_offset=offset, ref_counter=ref_counter,
                                                ref_counter_offset=ref_offset)
        else:
            self._start = _SHM_HEADER
            name = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
            key = secrets.token_bytes(_KEY_BYTES)
            size = _SHM_HEADER + nbytes
            self._path = SHM_DIR / name
            fd = os.open(self._path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                # Reserved now, so a full /dev/shm is an error here rather than SIGBUS at the first write.
                os.posix_fallocate(fd, 0, size)
                self._map = mmap.mmap(fd, size)
            except OSError:
                self._path.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            self._map[:_KEY_BYTES] = key
            self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
            self.region = zerocopy.SharedRegion(kind=SHM, name=name, size=size, key=key)

    def view(self, offset: int, dtype: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of wire dtype `dtype` at byte `offset` of the arena's room for tensors."""
        # A view made under inference mode cannot be written outside it, and one made outside it would be
        # tracked by autograd's version counter under it: one memo per mode.
        key = (offset, dtype, tuple(shape), torch.is_inference_mode_enabled())
        view = self._views.get(key)
        if view is None:
            torch_dtype = TORCH_DTYPES[dtype]
            start = self._start + offset
            view = self.buffer[start: start + math.prod(shape) * torch_dtype.itemsize].view(torch_dtype).view(shape)
            _remember(self._views, key, view)
        return view

    def message(self, offset: int, dtype: int, shape: tuple[int, ...]):
        """The SharedTensor naming that view (one instance per place: not to be changed)."""
        key = (offset, dtype, tuple(shape))
        message = self._messages.get(key)
        if message is None:
            message = zerocopy.SharedTensor(dtype=dtype, shape=key[2], region=self.region, offset=self._start + offset)
            _remember(self._messages, key, message)
        return message

    def record_event(self) -> bytes:
        """Record this GPU arena's own interprocess event on the current stream, after this call's writes into it;
        its IPC handle. One event per arena, not per stream, for a caller that goes on before the reply
        (gateway/pipelined_calls.py): the arena goes back to the pool only once the reply came, so the server has
        waited on one record before the next."""
        stream = current_stream(self.device)
        if self._event is None:
            self._event = ipc_event(stream)
        else:
            self._event[0].record(stream)
        return self._event[1]

    def remember(self, key, value) -> None:
        """Keep `value` in `derived` under `key` (a few dozen at most)."""
        _remember(self.derived, key, value)

    def poison(self) -> None:
        """Fill the room for tensors with 0xFF bytes (NaN as floats): tests reading after release see it."""
        self.buffer[self._start:].fill_(0xFF)

    def close(self) -> None:
        """Drop the arena; a shm name is unlinked (a server's mapping stays valid until it drops it)."""
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


def _remember(memo: dict, key, value) -> None:
    if len(memo) >= _VIEWS_PER_REGION:
        memo.clear()
    memo[key] = value


def aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class ArenaPool:
    """Arenas per (replica, device), reused across calls; one arena serves one call at a time.

    Idle arenas kept per (replica, device): `keep`, or as many as were out at once (up to `most`), whichever
    is more. An arena dropped is one a server goes on mapping until its own limit (RegionMaps), and a new one
    costs that server a fresh mapping, so a caller with several calls out per server (calls not waited for,
    gateway/pipelined_calls.py, on two micro-batches) must not drop some after every forward."""

    def __init__(self, keep: int = 4, most: int = 16):
        self.keep = keep
        self.most = most
        self._idle: dict[tuple[str, torch.device], list[Arena]] = {}
        self._out: dict[tuple[str, torch.device], int] = {}  # acquired and not yet released
        self._peak: dict[tuple[str, torch.device], int] = {}
        self._lock = threading.Lock()

    def acquire(self, owner: str, device: torch.device, nbytes: int) -> Arena:
        key = (owner, device)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            fits = [a for a in idle if a.nbytes >= nbytes]
            arena = min(fits, key=lambda a: a.nbytes) if fits else None
            if arena is not None:
                idle.remove(arena)
            out = self._out[key] = self._out.get(key, 0) + 1
            self._peak[key] = max(self._peak.get(key, 0), out)
        if arena is not None:
            if arena.last_read is not None:  # its last user's reads are done before we write
                stream = current_stream(device)
                if stream.cuda_stream != arena.read_on:  # on the same stream they are, in its order
                    stream.wait_event(arena.last_read)
            return arena
        size = _MIN_ARENA
        while size < nbytes:
            size *= 2
        return Arena(device, size)

    def release(self, owner: str, arena: Arena) -> None:
        """Back to the pool once the caller has read the result (on a GPU: its reads are queued, and the next
        user's stream waits for them)."""
        if arena.device.type == "cuda":
            if arena.last_read is None:
                arena.last_read = torch.cuda.Event()
            stream = current_stream(arena.device)
            arena.last_read.record(stream)
            arena.read_on = stream.cuda_stream
        key = (owner, arena.device)
        with self._lock:
            self._out[key] = max(self._out.get(key, 0) - 1, 0)
            keep = max(self.keep, min(self._peak.get(key, 0), self.most))
            idle = self._idle.setdefault(key, [])
            idle.append(arena)
            idle.sort(key=lambda a: -a.nbytes)
            for dropped in idle[keep:]:
                dropped.close()
            del idle[keep:]

    def close(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                for arena in idle:
                    arena.close()
            self._idle.clear()


class RegionMaps:
    """A server's mappings of callers' regions, each opened once; at most `limit` kept."""

    def __init__(self, kinds: list[int], limit: int = 256, shm_dir: Path = SHM_DIR):
        self.kinds = list(kinds)
        self.limit = limit
        self.shm_dir = shm_dir  # where shm regions are looked up (a test points one server elsewhere)
        self._maps: OrderedDict[tuple, tuple[torch.Tensor, dict]] = OrderedDict()
        self._lock = threading.Lock()
        self._cuda_index = {u: i for i, u in enumerate(local_gpu_uuids())} if CUDA in self.kinds else {}

    def tensor(self, shared, field: str, dtypes=SHARED_DTYPES) -> torch.Tensor:
        """The tensor `shared` (a SharedTensor) names, as a view of the mapped region; InvalidArgument names a
        bad field, FailedPrecondition a region this server cannot map (another host, GPU or kind)."""
        region = shared.region
        if region.kind not in KIND_NAMES:
            raise InvalidArgument(f"{field}.region.kind: {region.kind} is not REGION_KIND_SHM or REGION_KIND_CUDA")
        if region.kind not in self.kinds:
            raise FailedPrecondition(f"{field}: this server does not map shared memory of kind "
                                     f"{KIND_NAMES[region.kind]!r} (it maps {kind_names(self.kinds) or 'none'}); "
                                     "send the tensor in the message")
        if shared.dtype not in dtypes:
            raise InvalidArgument(f"{field}.dtype: {wire.dtype_name(shared.dtype)} is not one of "
                                  f"{[wire.dtype_name(d) for d in dtypes]}")
        shape = tuple(shared.shape)
        if len(shape) != 2 or min(shape) < 0:
            raise InvalidArgument(f"{field}.shape: {list(shape)} must be [tokens, hidden]")
        itemsize = TORCH_DTYPES[shared.dtype].itemsize
        nbytes = shape[0] * shape[1] * itemsize
        if shared.offset % itemsize or shared.offset + nbytes > region.size:
            raise InvalidArgument(f"{field}: {nbytes} bytes at offset {shared.offset} do not fit the region of "
                                  f"{region.size} bytes (or the offset is not a multiple of {itemsize})")
        if region.kind == SHM and shared.offset < _SHM_HEADER:
            raise InvalidArgument(f"{field}.offset: {shared.offset} is inside the region's key header "
                                  f"(tensors start at byte {_SHM_HEADER})")
        buffer, views = self._mapped(region, field)
        # A caller reuses its arenas call after call: the views are made once (three torch ops each, which
        # on a GPU cost more host time than the rest of a small call's decode).
        key = (shared.offset, shared.dtype, shape, torch.is_inference_mode_enabled())  # as in Arena.view
        view = views.get(key)
        if view is None:
            view = buffer[shared.offset: shared.offset + nbytes].view(TORCH_DTYPES[shared.dtype]).view(shape)
            _remember(views, key, view)
        return view

    def _mapped(self, region, field: str) -> tuple[torch.Tensor, dict]:
        """The region's bytes as a uint8 tensor, and the views of it made so far (by offset, dtype, shape)."""
        # The key is part of the cache key: a request naming a mapped region with another key maps it
        # anew, and is refused there.
        key = (region.kind, region.name, bytes(region.key), bytes(region.cuda_handle), region.cuda_offset,
               region.size)
        with self._lock:
            mapped = self._maps.get(key)
            if mapped is not None:
                self._maps.move_to_end(key)
                return mapped
        buffer = self._open_shm(region, field) if region.kind == SHM else self._open_cuda(region, field)
        with self._lock:
            mapped = self._maps[key] = (buffer, {})
            while len(self._maps) > self.limit:
                self._maps.popitem(last=False)  # unmapped once no call still holds a view
        return mapped

    def _open_shm(self, region, field: str) -> torch.Tensor:
        if not _SHM_NAME.match(region.name):
            raise InvalidArgument(f"{field}.region.name: {region.name!r} is not a moe-serve region name (moe-...)")
        # No symlink, only a regular file of this server's user, the key checked: one answer for every refusal.
        mapped = shm_files.map_region(self.shm_dir, region.name, region.size, bytes(region.key), _KEY_BYTES)
        if mapped is None:
            raise FailedPrecondition(shm_files.refusal(field, region.name))
        return torch.frombuffer(mapped, dtype=torch.uint8)

    def _open_cuda(self, region, field: str) -> torch.Tensor:
        index = self._cuda_index.get(region.device_uuid)
        if index is None:
            raise FailedPrecondition(f"{field}.region.device_uuid: GPU {region.device_uuid!r} is not visible to "
                                     "this server; send the tensor in the message")
        try:
            storage = torch.UntypedStorage._new_shared_cuda(
                index, bytes(region.cuda_handle), region.size, region.cuda_offset, bytes(region.ref_counter),
                region.ref_counter_offset, b"", False)
        except RuntimeError as err:
            raise FailedPrecondition(f"{field}: cannot map the caller's CUDA memory ({err}); "
                                     "send the tensor in the message") from err
        return torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage)
