"""Captured decode steps: the graphs of each (bucket, span) key, and how a callable becomes a graph.

The first step of a key runs its stages eagerly (on a side stream: cuBLAS and Triton pick kernels
there, as capture requires) and then captures them; capture runs nothing, so that first step's
result is the eager one. Later steps of the key replay. `GraphRecorder` is the one GPU-only part:
tests on the CPU hand StepGraphs a recorder whose "graph" is the captured callable itself, which
checks the bookkeeping (keys, order of replays and expert calls, recapture after the pool moves)
and that the stages read nothing but their buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

Stage = Callable[[], None]


class GraphRecorder:
    """Runs a callable eagerly before capture, and captures it into a replay callable."""

    @staticmethod
    def for_device(device: torch.device) -> GraphRecorder:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}: run the step eagerly (graphs=False)")
        return CudaGraphRecorder(device)

    def eager(self, fn: Stage) -> None:
        fn()

    def capture(self, fn: Stage) -> Stage:
        return fn


class CudaGraphRecorder(GraphRecorder):
    """CUDA graphs sharing one memory pool (replayed one at a time, in the order they were captured)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def eager(self, fn: Stage) -> None:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)

    def capture(self, fn: Stage) -> Stage:
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (an event loop staging tensors) do not break the capture
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            fn()
        return graph.replay


class StepGraphs:
    """The captured stages of each key; `run` replays them, with the host's expert calls in between."""

    def __init__(self, recorder: GraphRecorder):
        self.recorder = recorder
        self._graphs: dict[Hashable, list[Stage] | None] = {}  # None: the key runs eagerly (its capture failed)
        self.captures = 0  # keys captured so far (tests and benchmarks read it)
        self.failures: list[str] = []  # why captures failed, one line each

    def clear(self) -> None:
        self._graphs.clear()

    def run(self, key: Hashable, stages: Sequence[Stage], call: Callable[[int], None], whole: bool) -> None:
        """stages[0], call(0), stages[1], call(1), ..., stages[-1]; `whole`: the calls are captured too."""
        def step() -> None:
            for j, stage in enumerate(stages):
                stage()
                if j + 1 < len(stages):
                    call(j)

        if key not in self._graphs:
            self.recorder.eager(step)
            try:
                self._graphs[key] = ([self.recorder.capture(step)] if whole
                                     else [self.recorder.capture(s) for s in stages])
                self.captures += 1
            except RuntimeError as err:  # a step must not fail for want of a graph: this key stays eager
                self._graphs[key] = None
                self.failures.append(f"{key}: {err}")
            return
        graphs = self._graphs[key]
        if graphs is None:
            step()
            return
        for j, graph in enumerate(graphs):
            graph()
            if not whole and j + 1 < len(graphs):
                call(j)
