"""ExpertService: decode a RunExperts request, run the bank off the event loop, encode the reply."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from moe_client import wire, zerocopy
from moe_client.ownership import to_messages
from moe_client.pb import experts_pb2, experts_pb2_grpc
from moe_serve import __version__
from moe_serve.expert_server.bank import ExpertBank
from moe_serve.expert_server.live_placement import InflightCalls
from moe_serve.expert_server.merger import CallMerger, Work
from moe_serve.expert_server.routed_calls import ExpertMasks, decode_routed
from moe_serve.observability.metrics import ServiceMetrics
from moe_serve.rpc import shared_regions, stream_signals
from moe_serve.rpc.codec import TORCH_DTYPES, WIRE_DTYPES, from_wire, to_wire_owned
from moe_serve.rpc.errors import FailedPrecondition, InvalidArgument
from moe_serve.rpc.finite import all_finite, finite_hint
from moe_serve.rpc.gpu_events import IPC_HANDLE_BYTES, GpuEvents, current_stream
from moe_serve.rpc.message_limits import check_reply
from moe_serve.rpc.registration import add_servicer
from moe_serve.rpc.server import rpc
from moe_serve.rpc.shared_regions import RegionMaps

_INT_IDS = (wire.INT32, wire.INT64)
_FLOAT = (wire.FLOAT32, wire.BFLOAT16, wire.FLOAT16, wire.FLOAT8_E4M3)


def decode_request(request, hidden_size: int, regions: RegionMaps | None = None,
                   deferred: list | None = None):
    """Validated (hidden [T, H], expert_ids [T, K], weights [T, K]); InvalidArgument names the bad field.

    With `regions`, hidden states named by `shared_hidden` are read where the caller left them. With
    `deferred`, the NaN check of hidden states on a GPU is left there as (field, tensor, rpc.finite hint) for
    the caller to read after the computation's own synchronisation, instead of synchronising here.
    """
    if request.shared_hidden.region.kind:
        if regions is None:
            raise FailedPrecondition("shared_hidden: this server does not map shared memory (--shared-memory "
                                     "off); send the tensor in the message")
        if request.hidden.data or request.hidden.shape:
            raise InvalidArgument("hidden: set together with shared_hidden; send one of them")
        hidden = regions.tensor(request.shared_hidden, "shared_hidden")
    else:
        hidden = from_wire(request.hidden, "hidden", _FLOAT)
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise InvalidArgument(f"hidden: shape {list(hidden.shape)} must be [tokens, {hidden_size}]")
    if hidden.shape[0] == 0:
        raise InvalidArgument("hidden: empty batch (0 tokens)")
    ids = from_wire(request.expert_ids, "expert_ids", _INT_IDS)
    weights = from_wire(request.weights, "weights", (wire.FLOAT32,))
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or ids.shape[1] == 0:
        raise InvalidArgument(f"expert_ids: shape {list(ids.shape)} must be [{hidden.shape[0]}, K] with K >= 1")
    if weights.shape != ids.shape:
        raise InvalidArgument(f"weights: shape {list(weights.shape)} differs from expert_ids {list(ids.shape)}")
    if not all_finite(weights):
        raise InvalidArgument("weights: contains NaN or Inf")
    if deferred is not None and hidden.is_cuda:
        deferred.append(("hidden", hidden, finite_hint(hidden)))
    elif not all_finite(hidden):
        raise InvalidArgument("hidden: contains NaN or Inf")
    return hidden, ids, weights


class ExpertServicer(experts_pb2_grpc.ExpertServiceServicer):
    """Serves one ExpertBank; compute runs on a worker thread so health checks answer meanwhile."""

    max_reply_bytes: int | None = None  # the server's message limit: larger replies are refused before compute

    def __init__(self, bank: ExpertBank, info: experts_pb2.GetInfoResponse, workers: int = 1,
                 metrics: ServiceMetrics | None = None, merge: bool = True):
        self.bank = bank
        self.info = info
        self.metrics = metrics or ServiceMetrics("expert_server")
        self.metrics.expert_tokens.watch(bank.drain_token_counts)  # counted inside the computations
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="experts")
        # Concurrent calls of a layer share one computation; the queue wait goes to the metrics.
        self.merger = CallMerger(bank, self.executor, merge, on_wait=self.metrics.queue_wait.observe)
        self.calls = InflightCalls()  # what a live drop waits for (live_placement.py)
        self.masks = ExpertMasks(bank.num_experts)  # device-routed calls: the experts each one lists
        self.events = GpuEvents()  # device-routed calls that do not synchronise (rpc/gpu_events.py)
        self.side = None  # the side channels (side_calls.SideCalls), when offered

    @property
    def info(self) -> experts_pb2.GetInfoResponse:
        return self._info

    @info.setter
    def info(self, info: experts_pb2.GetInfoResponse) -> None:
        self._info = info
        # Callers on this host may leave tensors in shared memory (shared_regions.py) of these kinds.
        self.regions = RegionMaps(list(info.shared_kinds)) if info.shared_kinds else None

    def prepare(self, request) -> Work:
        """Check and decode a RunExperts request into the bank's work (on the worker, under the bank's lock:
        it may read a caller's GPU memory); the error names the bad field. Both stages around the compute,
        this one and the Work's `finish`, are timed into moe_expert_call_stage_seconds."""
        start = time.perf_counter()
        work = self._prepare(request)
        work.finish = partial(_timed, self.metrics, "finish", work.finish)
        self.metrics.observe_stage("prepare", time.perf_counter() - start)
        return work

    def _prepare(self, request) -> Work:
        if request.model_fingerprint and request.model_fingerprint != self.info.model_fingerprint:
            raise FailedPrecondition(
                f"model_fingerprint: the caller serves checkpoint {request.model_fingerprint}, this server "
                f"({self.info.server_name}) serves {self.info.model_fingerprint}; start both on the same checkpoint")
        if request.shared_expert_ids.region.kind:
            return self._prepare_routed(request)
        if request.gpu_event or request.shared_done.region.kind:
            field = "gpu_event" if request.gpu_event else "shared_done"
            raise InvalidArgument(f"{field}: set without shared_expert_ids; only a device-routed call may "
                                  "leave its tensors unsynchronised")
        deferred: list = []
        hidden, ids, weights = decode_request(request, self.bank.hidden_size, self.regions, deferred)
        if request.shared_output.region.kind:
            dest = self.regions.tensor(request.shared_output, "shared_output") if self.regions else None
            if dest is None:
                raise FailedPrecondition("shared_output: this server does not map shared memory "
                                         "(--shared-memory off); leave it unset")
            if dest.shape != hidden.shape:
                raise InvalidArgument(f"shared_output.shape: {list(dest.shape)} differs from hidden "
                                      f"{list(hidden.shape)}")
            out_dtype = request.shared_output.dtype
            finish = partial(_write_shared, dest, request.shared_output.dtype, None)
        else:
            out_dtype = request.output_dtype or request.hidden.dtype or request.shared_hidden.dtype
            if out_dtype not in _FLOAT:
                raise InvalidArgument(f"output_dtype: {wire.dtype_name(out_dtype)} is not a float wire dtype")
            # Encoded on the worker thread, into bytes of the reply's own: the bank's result may be a view of
            # a buffer the next computation reuses, and plain to_wire would borrow those bytes (zero copy).
            # fp8 replies are quantised from float32 (the quantisation makes new buffers).
            finish = partial(to_wire_owned, dtype=out_dtype)
            dest = None
            check_reply("RunExperts", wire_bytes(hidden.shape, out_dtype), self.max_reply_bytes)
        self.bank.check(request.layer, ids)
        if deferred:
            finish = partial(_checked, finish, deferred)
        work = Work(request.layer, hidden, ids, weights, TORCH_DTYPES.get(out_dtype, torch.float32), finish,
                    on_device=dest is not None and dest.is_cuda)
        self.calls.enter(work)  # under the bank's lock, as a live drop's last look is
        return work

    def _prepare_routed(self, request) -> Work:
        """A device-routed call (routed_calls.py): every token, the routing in the caller's memory."""
        if self.regions is None:
            raise FailedPrecondition("shared_expert_ids: this server does not map shared memory (--shared-memory "
                                     "off); send the tensors in the message")
        hidden, ids, weights, experts = decode_routed(request, self.bank.hidden_size, self.bank.num_experts,
                                                      self.regions)
        dest = self.regions.tensor(request.shared_output, "shared_output")
        if dest.shape != hidden.shape or dest.device != hidden.device:
            raise InvalidArgument(f"shared_output: shape {list(dest.shape)} on {dest.device} differs from hidden "
                                  f"{list(hidden.shape)} on {hidden.device}")
        whole = self.bank.holds_exactly(request.layer, experts)
        if not whole:
            self.bank.check(request.layer, torch.tensor(experts))  # NOT_FOUND names any listed expert not here
        device = hidden.device
        reply_event = b""
        if request.gpu_event:
            if len(request.gpu_event) != IPC_HANDLE_BYTES:
                raise InvalidArgument(f"gpu_event: {len(request.gpu_event)} bytes; a CUDA IPC event handle has "
                                      f"{IPC_HANDLE_BYTES}")
            if not hidden.is_cuda:
                raise InvalidArgument("gpu_event: set for tensors in host memory")
            try:
                self.events.wait(device, request.gpu_event)  # before any read of the caller's tensors
            except RuntimeError as err:  # CUDA refused the handle: not an event of a process on this host
                raise InvalidArgument(f"gpu_event: {len(request.gpu_event)} bytes that CUDA does not open as an "
                                      f"IPC event handle ({err})") from err
            if set(self.bank.stacks(request.layer)) == {device}:
                reply_event = self.events.handle(device)
            else:  # experts on another device: copies there go by other streams, so wait here (and reply late)
                torch.cuda.current_stream(device).synchronize()
        if not whole:  # else expert_sums skips what is not here itself
            ids = self.masks.keep(ids, experts)
        record = partial(self.events.record, device) if reply_event else None
        if request.shared_done.region.kind:  # the caller's stream waits for a word, not for our event
            record, reply_event = partial(_set_word, device, self._done_word(request, device)), b""
        finish = partial(_write_shared, dest, request.shared_output.dtype, record)
        work = Work(request.layer, hidden, ids, weights, TORCH_DTYPES[request.shared_output.dtype], finish,
                    on_device=dest.is_cuda, reply_event=reply_event)
        self.calls.enter(work)  # under the bank's lock, as a live drop's last look is
        return work

    def _done_word(self, request, device: torch.device) -> tuple[int, int]:
        """(device address, value) of the word a device-routed call's shared_done names; the error names the bad
        field."""
        if not request.gpu_event:
            raise InvalidArgument("shared_done: set without gpu_event; only a call that leaves its tensors "
                                  "unsynchronised may be answered by a word")
        if not self.info.done_signals:
            raise FailedPrecondition("shared_done: this server's GPUs do not take stream memory operations "
                                     "(GetInfo done_signals is false); leave it unset")
        words = self.regions.tensor(request.shared_done, "shared_done", (wire.INT32,))
        if words.shape[1] != 1 or words.device != device:
            raise InvalidArgument(f"shared_done: shape {list(words.shape)} on {words.device} must be [N, 1] on "
                                  f"{device}, the call's device")
        if request.done_index >= words.shape[0]:
            raise InvalidArgument(f"done_index: {request.done_index} is not below {words.shape[0]}, the words "
                                  "shared_done names")
        return words.data_ptr() + 4 * request.done_index, request.done_value

    def observe(self, work: Work, seconds: float) -> None:
        """Count a finished call in the metrics."""
        self.metrics.observe_batch("RunExperts", work.hidden.shape[0])
        self.metrics.observe_compute(work.layer, seconds)

    @rpc
    async def RunExperts(self, request, context):
        # The event loop only moves bytes: decoding, checks, compute and encoding run on the worker.
        output, seconds, work = await self.merger.run_prepared(partial(self.prepare, request))
        self.observe(work, seconds)
        return zerocopy.RunExpertsResponse(output=output, compute_seconds=seconds,
                                           placement_version=self.info.placement_version,
                                           gpu_event=work.reply_event)

    @rpc
    async def GetInfo(self, request, context):
        return self.info


def wire_bytes(shape: tuple[int, ...], dtype: int) -> int:
    """Bytes of a [T, H] tensor of wire dtype `dtype` in a message: its elements, and fp8's float32 scale a row."""
    rows_scales = 4 * shape[0] if dtype == wire.FLOAT8_E4M3 and len(shape) > 1 else 0
    return math.prod(shape) * wire.STORAGE[dtype].itemsize + rows_scales


def _timed(metrics, stage: str, fn, *args):
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        metrics.observe_stage(stage, time.perf_counter() - start)


def _write_shared(dest: torch.Tensor, dtype: int, record, out: torch.Tensor) -> wire.WireTensor:
    """Copy the result into the caller's region; it is complete (synchronised) before the reply goes, or,
    with `record` (a device-routed call that waits on nobody), once the event it records completes."""
    dest.copy_(out)
    if record is not None:
        record()
    else:
        for device in {t.device for t in (dest, out) if t.is_cuda}:
            torch.cuda.synchronize(device)
    return wire.WireTensor(dtype=dtype, shape=tuple(dest.shape))


def _set_word(device: torch.device, word: tuple[int, int]) -> None:
    """The current stream sets the caller's done word (address, value) after the output's writes."""
    stream_signals.write(current_stream(device), *word)


def _checked(finish, deferred: list, out: torch.Tensor):
    """finish(out), then the checks decode_request left on the GPU: read after finish's synchronisation, they
    cost no wait of their own. A call that fails them gets INVALID_ARGUMENT (what it wrote is not used)."""
    value = finish(out)
    for field, tensor, hint in deferred:
        if not all_finite(tensor, hint):
            raise InvalidArgument(f"{field}: contains NaN or Inf")
    return value


def add_to_server(servicer: ExpertServicer, server) -> None:
    """Register the servicer; RunExperts reads and writes its tensors without copying them (zerocopy)."""
    add_servicer(server, experts_pb2.DESCRIPTOR.services_by_name["ExpertService"], servicer)


def server_info(bank: ExpertBank, fingerprint: str, spec, name: str, shared_memory: bool = True,
                placement_version: int = 0, listed=None) -> experts_pb2.GetInfoResponse:
    """The GetInfoResponse a bank answers GetInfo with; `shared_memory` offers the same-host fast path;
    `listed` (default: all the bank holds) the ownership to announce, less experts being dropped."""
    listed = bank.owned if listed is None else listed
    return experts_pb2.GetInfoResponse(
        model_fingerprint=fingerprint,
        model_type=spec.model_type,
        hidden_size=spec.hidden_size,
        num_experts=spec.num_experts,
        moe_layers=list(spec.moe_layers),
        owned=to_messages(listed),
        devices=bank.devices(),
        compute_dtype=WIRE_DTYPES[bank.dtype],
        placement=[experts_pb2.ExpertPlacement(layer=p.layer, expert=p.expert, device=str(p.device))
                   for p in bank.placement() if p.expert in listed.get(p.layer, ())],
        server_version=__version__,
        server_name=name,
        host_id=shared_regions.host_id(),
        shared_kinds=shared_regions.local_kinds() if shared_memory else [],
        gpu_uuids=shared_regions.local_gpu_uuids() if shared_memory else [],
        compute_gpu_uuids=[shared_regions.gpu_uuid(torch.device(d)) for d in bank.devices() if d.startswith("cuda")],
        routed_calls=True,
        done_signals=done_signals(bank),
        placement_version=placement_version,
    )


def done_signals(bank: ExpertBank) -> bool:
    """Whether every GPU the bank computes on takes stream memory operations (rpc/stream_signals.py)."""
    gpus = [torch.device(d) for d in bank.devices() if d.startswith("cuda")]
    return bool(gpus) and all(stream_signals.available(d) for d in gpus)
