"""The experts one server owns, loaded from the checkpoint onto its devices, and their grouped run.

Each device holds its experts of a layer stacked (core.grouped.StackedExperts) and runs them in two
grouped GEMMs. A request's hidden states go to each device once; the routed rows are gathered there,
and each device sums its experts' weighted outputs per token before one copy back.
Legend: T = tokens, H = hidden size, K = expert slots per token, N = routed (token, expert) pairs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from moe_client.ownership import Ownership, format_ranges
from moe_serve.core.experts import ExpertWeights
from moe_serve.core.grouped import StackedExperts, Swiglu, expert_sums, grouped_supported, grouped_swiglu, looped_swiglu
from moe_serve.expert_server.cuda_graphs import GraphedExperts
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.rpc.errors import InvalidArgument, NotFound


@dataclass(frozen=True)
class Placed:
    """One owned expert and the device it lives on."""

    layer: int
    expert: int
    device: torch.device


@dataclass(frozen=True)
class _DeviceGroup:
    """One layer's experts on one device, with the expert-id -> slot table and the kernel to use."""

    stacked: StackedExperts
    slot_of: torch.Tensor  # [E] slot on this device or -1
    swiglu: Swiglu
    tokens: torch.Tensor  # [G] int64 on the device: tokens each slot got since the last drain (the metrics')

    @classmethod
    def of(cls, stacked: StackedExperts, num_experts: int, swiglu: Swiglu) -> _DeviceGroup:
        return cls(stacked, stacked.slot_of(num_experts), swiglu,
                   torch.zeros(len(stacked.expert_ids), dtype=torch.long, device=stacked.device))


def assign_devices(expert_ids: list[int], devices: list[torch.device]) -> dict[int, torch.device]:
    """Round-robin, as the seed's multi-GPU script: the n-th owned expert goes to devices[n % len]."""
    return {e: devices[n % len(devices)] for n, e in enumerate(sorted(expert_ids))}


class ExpertBank:
    """Owned experts of some MoE layers, spread over devices, in one compute dtype."""

    def __init__(self, experts: Mapping[tuple[int, int], ExpertWeights], num_experts: int, hidden_size: int,
                 dtype: torch.dtype, cuda_graph_tokens: int = 16384):
        """experts: (layer, expert) -> weights, already on their devices in `dtype`.

        GPU calls of up to `cuda_graph_tokens` tokens replay captured CUDA graphs (0 turns them off).
        """
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        # One user of the devices at a time: a computation, a CUDA graph capture (which fails if another
        # thread touches the GPU meanwhile), or the decoding of a request whose tensors are on a GPU.
        self.lock = threading.RLock()
        self.dtype = dtype
        self._owned: dict[int, list[int]] = {}
        self._tables: dict[int, tuple[list[int], np.ndarray]] = {}  # check's lookup tables, by layer
        self._pinned_buffers: dict[str, torch.Tensor] = {}
        self._graphed: dict[torch.device, GraphedExperts] = {}
        self._groups: dict[int, list[_DeviceGroup]] = {}
        self._retired: list[tuple[int, _DeviceGroup]] = []  # groups swapped out, until their tallies are read
        self._cuda_graph_tokens = cuda_graph_tokens
        self._kernels: dict[torch.device, Swiglu] = {}
        by_layer: dict[int, dict[int, ExpertWeights]] = {}
        for (layer, expert), w in sorted(experts.items()):
            by_layer.setdefault(layer, {})[expert] = w
        for layer, group in by_layer.items():
            self.add_layer(layer, group)

    def add_layer(self, layer: int, experts: Mapping[int, ExpertWeights]) -> None:
        """Stack one layer's experts per device (then the caller's per-expert tensors can be freed)."""
        by_device: dict[torch.device, dict[int, ExpertWeights]] = {}
        self._tables.pop(layer, None)  # the ownership list grows in place here (only while loading)
        for expert, w in sorted(experts.items()):
            self._owned.setdefault(layer, []).append(expert)
            by_device.setdefault(w.device, {})[expert] = w
        for device, group in by_device.items():
            if device not in self._kernels:
                self._kernels[device] = grouped_swiglu if grouped_supported(device, self.dtype) else looped_swiglu
            stacked = StackedExperts.stack(group)
            self._groups.setdefault(layer, []).append(_DeviceGroup.of(stacked, self.num_experts,
                                                                      self._kernels[device]))
            # Capturable only on the bf16 CUTLASS kernel: the looped fallback and torch's float32
            # grouped_mm on CUDA read the group offsets on the host.
            graphable = (self._kernels[device] is grouped_swiglu and device.type == "cuda"
                         and self.dtype == torch.bfloat16 and self._cuda_graph_tokens > 0)
            if graphable and device not in self._graphed:
                self._graphed[device] = GraphedExperts(device, self.hidden_size, self.dtype, self._cuda_graph_tokens)

    def stacks(self, layer: int) -> dict[torch.device, StackedExperts]:
        """`layer`'s experts on each device ({} for a layer not held)."""
        return {g.stacked.device: g.stacked for g in self._groups.get(layer, ())}

    def replace_stacks(self, layer: int, stacks: Mapping[torch.device, StackedExperts]) -> None:
        """Serve `layer` from these stacks from the next call on (live loads and drops).

        Copy-on-write: a computation already running keeps the lists it read, and each swap is one
        assignment, so the event loop may swap while a worker thread computes.
        """
        groups = []
        for device, stacked in stacks.items():
            if device not in self._kernels:
                self._kernels[device] = grouped_swiglu if grouped_supported(device, self.dtype) else looped_swiglu
            groups.append(_DeviceGroup.of(stacked, self.num_experts, self._kernels[device]))
            graphable = (self._kernels[device] is grouped_swiglu and device.type == "cuda"
                         and self.dtype == torch.bfloat16 and self._cuda_graph_tokens > 0)
            if graphable and device not in self._graphed:
                self._graphed[device] = GraphedExperts(device, self.hidden_size, self.dtype, self._cuda_graph_tokens)
        for graphed in self._graphed.values():
            graphed.forget(layer)
        ids = sorted(e for g in groups for e in g.stacked.expert_ids)
        self._retired.extend((layer, g) for g in self._groups.get(layer, ()))  # their last counts not read yet
        self._groups = {k: v for k, v in self._groups.items() if k != layer} | ({layer: groups} if groups else {})
        self._owned = {k: v for k, v in self._owned.items() if k != layer} | ({layer: ids} if ids else {})

    @classmethod
    def load(cls, checkpoint: Checkpoint, owned: Ownership, devices: list[torch.device], dtype: torch.dtype,
             progress: Callable[[int, int], None] | None = None, cuda_graph_tokens: int = 16384) -> ExpertBank:
        """Read only the owned experts' tensors and place them round-robin on `devices`."""
        spec = checkpoint.spec
        h, i = spec.hidden_size, spec.expert_width
        shapes = ((i, h), (i, h), (h, i))
        device_of = assign_devices(sorted(set().union(*owned.values())) if owned else [], devices)
        bank = cls({}, spec.num_experts, h, dtype, cuda_graph_tokens)
        for layer, ids in sorted(owned.items()):
            experts: dict[int, ExpertWeights] = {}
            for expert in ids:
                names = spec.expert_names(layer, expert)
                tensors = [checkpoint.load(name, shape) for name, shape in zip(names, shapes, strict=True)]
                experts[expert] = ExpertWeights(*tensors).to(device_of[expert], dtype)
                if progress is not None:
                    progress(layer, expert)
            bank.add_layer(layer, experts)  # stacked now: peak memory stays one layer above the result
        return bank

    @property
    def owned(self) -> Ownership:
        """layer -> owned expert ids."""
        return {layer: tuple(ids) for layer, ids in sorted(self._owned.items())}

    def placement(self) -> list[Placed]:
        """Every owned (layer, expert) with its device."""
        return sorted((Placed(layer, e, g.stacked.device) for layer, groups in self._groups.items()
                       for g in groups for e in g.stacked.expert_ids), key=lambda p: (p.layer, p.expert))

    def devices(self) -> list[str]:
        """Distinct devices in use, in placement order."""
        return list(dict.fromkeys(str(p.device) for p in self.placement()))

    def nbytes(self) -> int:
        """Bytes of expert weights held."""
        return sum(self.nbytes_by_device().values())

    def nbytes_by_device(self) -> dict[str, int]:
        """Bytes of expert weights held on each device."""
        out: dict[str, int] = {}
        for groups in self._groups.values():
            for g in groups:
                key = str(g.stacked.device)
                out[key] = out.get(key, 0) + g.stacked.gate_up.nbytes + g.stacked.down.nbytes
        return out

    def holds_exactly(self, layer: int, experts: list[int]) -> bool:
        """Whether `experts` (ascending) are all of `layer`'s experts here."""
        return self._owned.get(layer) == experts

    def check(self, layer: int, expert_ids: torch.Tensor) -> None:
        """NOT_FOUND for a layer or expert id this server does not own; INVALID_ARGUMENT for ids below -1."""
        owned_ids = self._owned.get(layer)
        if owned_ids is None:
            raise NotFound(f"layer {layer} has no experts on this server; it holds layers {sorted(self._owned)}")
        # The usual answer (all owned) from a lookup table in numpy, without sorting the ids (torch.unique took
        # ~0.8 ms at 4,096 tokens x top-6 on the 2-core machine); only a refusal goes on to name the bad ids.
        if not expert_ids.is_cuda and expert_ids.numel():
            flat = expert_ids.reshape(-1).numpy()
            if (flat.min() >= -1 and flat.max() < self.num_experts
                    and self._owned_table(layer, owned_ids)[flat + 1].all()):
                return
        ids = torch.unique(expert_ids).tolist()
        if ids and ids[0] < -1:
            raise InvalidArgument(f"expert_ids: negative id {ids[0]} (only -1 marks an unused slot)")
        owned = set(self._owned[layer])
        unknown = [e for e in ids if e >= 0 and e not in owned]
        if unknown:
            raise NotFound(f"layer {layer}: experts {format_ranges(unknown)} are not on this server; "
                           f"it holds {format_ranges(self._owned[layer])}")

    def _owned_table(self, layer: int, owned_ids: list[int]) -> np.ndarray:
        """[E + 1] bool: entry e + 1 says whether expert e of `layer` is here (entry 0, id -1: an unused slot).
        Cached per ownership list: replace_stacks swaps in a new list, so a table never outlives its list."""
        cached = self._tables.get(layer)
        if cached is None or cached[0] is not owned_ids:
            table = np.zeros(self.num_experts + 1, dtype=bool)
            table[0] = True
            table[np.asarray(owned_ids, dtype=np.int64) + 1] = True
            cached = self._tables[layer] = (owned_ids, table)
        return cached[1]

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
            out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
        """[T, H] weighted sum over each token's owned experts (valid until the next call), and its seconds."""
        self.check(layer, expert_ids)
        start = time.perf_counter()
        out = self.compute(layer, hidden, expert_ids, weights, out_dtype)
        return out, time.perf_counter() - start

    @torch.inference_mode()
    def compute(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, on_device: bool = False) -> torch.Tensor:
        """The unchecked math of `run`, as a CPU tensor of `out_dtype` (`on_device`: left on the first GPU).

        The result may be a view of a reused buffer (page-locked, or a CUDA graph's output): consume it
        before the next call.
        """
        return self.gather(self.launch(layer, hidden, expert_ids, weights), out_dtype, on_device)

    @torch.inference_mode()
    def launch(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
               weights: torch.Tensor) -> list[torch.Tensor]:
        """Queue every device's work without waiting; returns per-device [T, H] float32 partial sums."""
        staged: dict[str, torch.Tensor] = {}
        partials = []
        for group in self._groups[layer]:
            device = group.stacked.device
            inputs = []
            for t, name in ((hidden, "hidden"), (expert_ids, "ids"), (weights, "weights")):
                if device.type == "cuda" and t.device.type == "cpu":
                    # Through page-locked memory: an asynchronous copy, not a wait for the stream per tensor.
                    if name not in staged:
                        staged[name] = self._pinned_copy(t, name)
                    inputs.append(staged[name].to(device, non_blocking=True))
                else:
                    inputs.append(t.to(device))
            graphed = self._graphed.get(device)
            # Kernels (Triton's included) and graph captures go to the current device's stream.
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                if graphed is not None:
                    partials.append(graphed.run(layer, group.stacked, group.slot_of, group.swiglu, group.tokens,
                                                *inputs))
                else:
                    partials.append(expert_sums(*inputs, group.stacked, group.slot_of, group.swiglu,
                                                tally=group.tokens))
        return partials

    def drain_token_counts(self) -> list[tuple[int, tuple[int, ...], torch.Tensor]]:
        """(layer, experts, tokens each got) since the last drain, counts on the host; the tallies restart at 0.
        Under the bank's lock, so no computation adds meanwhile; a GPU tally's read waits for its stream."""
        with self.lock, torch.inference_mode():  # as `launch`: a tally made under inference mode is changed under it
            retired, self._retired = self._retired, []
            groups = [(layer, g) for layer, gs in self._groups.items() for g in gs] + retired
            out = []
            for layer, group in groups:
                out.append((layer, group.stacked.expert_ids, group.tokens.to("cpu", copy=True)))
                group.tokens.zero_()
        return out

    def gather(self, partials: list[torch.Tensor], out_dtype: torch.dtype, on_device: bool = False) -> torch.Tensor:
        """Sum per-device partials: GPU ones on the first GPU, one copy back through pinned memory
        (`on_device`: the sum stays on that GPU, CPU partials added there)."""
        on_gpu = [p for p in partials if p.device.type == "cuda"]
        on_cpu = [p for p in partials if p.device.type != "cuda"]
        total = on_cpu[0] if on_cpu else None
        for p in on_cpu[1:]:
            total = total + p
        if on_gpu:
            gpu_total = on_gpu[0]
            for p in on_gpu[1:]:
                gpu_total = gpu_total + p.to(gpu_total.device, non_blocking=True)
            if on_device:
                if total is not None:
                    gpu_total = gpu_total + total.to(gpu_total.device)
                return gpu_total.to(out_dtype)
            dtype = torch.float32 if on_cpu else out_dtype
            host = self._pinned_view(gpu_total.shape, dtype, "out")
            host.copy_(gpu_total.to(dtype), non_blocking=True)
            torch.cuda.synchronize(gpu_total.device)
            total = host if total is None else total + host
        return total.to(out_dtype)

    def _pinned_view(self, shape: torch.Size, dtype: torch.dtype, key: str) -> torch.Tensor:
        """A reusable page-locked buffer viewed as `shape` / `dtype` (grown by doubling; one caller at a time)."""
        nbytes = shape.numel() * dtype.itemsize
        buf = self._pinned_buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 2 * (0 if buf is None else buf.numel())), dtype=torch.uint8,
                              pin_memory=True)
            self._pinned_buffers[key] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def _pinned_copy(self, tensor: torch.Tensor, key: str) -> torch.Tensor:
        """`tensor` copied into page-locked memory, so copies to GPUs are asynchronous and full speed."""
        host = self._pinned_view(tensor.shape, tensor.dtype, key)
        host.copy_(tensor)
        return host


class InProcessExperts:
    """ExpertBackend over a bank in this process, results on the caller's device: the one-process baseline."""

    def __init__(self, bank: ExpertBank):
        self.bank = bank

    def run(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Ids on a GPU are the model's own router's, taken as they are, as a server takes a device-routed call's:
        # checking them would wait for the GPU at every MoE layer (torch.unique), which the served path does not.
        if not expert_ids.is_cuda:
            self.bank.check(layer, expert_ids)
        partials = self.bank.launch(layer, hidden, expert_ids, weights)
        out = partials[0].to(hidden.device, copy=True)  # a copy: CUDA-graph outputs are reused by the next call
        for partial in partials[1:]:
            out += partial.to(hidden.device)
        return out
