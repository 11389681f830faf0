"""The gateway's batching settings (flags / MOE_* variables) and the parts they switch on."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from moe_serve.core.causal_lm import CausalLM
from moe_serve.core.experts import ExpertBackend
from moe_serve.core.simple_model import SimpleMoEModel
from moe_serve.gateway.forward_batcher import ForwardBatcher
from moe_serve.gateway.overlap import PingPong
from moe_serve.gateway.scheduler import GenerateScheduler, SchedulerLimits
from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.process.env import env, env_flag


@dataclass(frozen=True)
class BatchingConfig:
    """How the gateway merges concurrent requests and overlaps expert calls with dense work."""

    batching: bool = True  # False: each request runs alone on a worker thread (the comparison baseline)
    # Two micro-batches in turns, shared experts during the RunExperts calls; None: the gateway chooses (on,
    # unless an expert server shares the dense layers' GPU without MPS: gateway/shared_gpu.py).
    overlap: bool | None = None
    overlap_min_tokens: int = 64  # steps / batches smaller than this stay one micro-batch (docs/benchmarks.md)
    max_batch_tokens: int = 4096  # Forward: tokens per batch (a larger single request runs alone)
    max_queue_delay_ms: float = 2.0  # Forward: how long the oldest request waits for company
    max_prefill_tokens: int = 128  # Generate: prompt tokens per step (~2x a decode step of 32: prefill_cost.py)
    max_running_requests: int = 128  # Generate: sequences per step
    max_queued_requests: int = 1024  # waiting requests (each of Forward, Generate); more: RESOURCE_EXHAUSTED
    # Generate: decode-only steps through core.decode_step (CUDA graphs on a GPU); None: on when the dense layers
    # are on a GPU (measured there: docs/gpu.md), off on the CPU, where its eager stages gain nothing.
    decode_graphs: bool | None = None



def add_batching_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the batching settings; each default can come from MOE_<FLAG>."""
    d = BatchingConfig()
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=env_flag("BATCHING", d.batching),
                   help="batch concurrent Forward requests and Generate streams (continuous batching); "
                        "--no-batching runs each request alone (env MOE_BATCHING; default on)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction,
                   default=None if env("OVERLAP") is None else env_flag("OVERLAP", True),
                   help="split each batch in two micro-batches whose dense layers run while the other's expert "
                        "calls are in flight, and run shared experts during the expert calls (env MOE_OVERLAP; "
                        "default on, unless an expert server computes on the dense layers' GPU and no MPS "
                        "daemon runs)")
    p.add_argument("--overlap-min-tokens", type=int,
                   default=int(env("OVERLAP_MIN_TOKENS", str(d.overlap_min_tokens))),
                   help="split a step or batch in two micro-batches only from this many tokens: smaller ones "
                        "would pay each expert call's fixed cost twice for little to hide "
                        f"(env MOE_OVERLAP_MIN_TOKENS; default {d.overlap_min_tokens})")
    p.add_argument("--max-batch-tokens", type=int, default=int(env("MAX_BATCH_TOKENS", str(d.max_batch_tokens))),
                   help=f"tokens per Forward batch (env MOE_MAX_BATCH_TOKENS; default {d.max_batch_tokens})")
    p.add_argument("--max-queue-delay-ms", type=float,
                   default=float(env("MAX_QUEUE_DELAY_MS", str(d.max_queue_delay_ms))),
                   help="how long a Forward request may wait for others to batch with "
                        f"(env MOE_MAX_QUEUE_DELAY_MS; default {d.max_queue_delay_ms})")
    p.add_argument("--max-prefill-tokens", type=int,
                   default=int(env("MAX_PREFILL_TOKENS", str(d.max_prefill_tokens))),
                   help="prompt tokens per Generate step, so new prompts delay the running streams' next token "
                        f"by a bounded amount (env MOE_MAX_PREFILL_TOKENS; default {d.max_prefill_tokens})")
    p.add_argument("--max-running-requests", type=int,
                   default=int(env("MAX_RUNNING_REQUESTS", str(d.max_running_requests))),
                   help=f"Generate streams per step (env MOE_MAX_RUNNING_REQUESTS; default {d.max_running_requests})")
    p.add_argument("--max-queued-requests", type=int,
                   default=int(env("MAX_QUEUED_REQUESTS", str(d.max_queued_requests))),
                   help="requests waiting for a batch; more are refused with RESOURCE_EXHAUSTED "
                        f"(env MOE_MAX_QUEUED_REQUESTS; default {d.max_queued_requests})")

    p.add_argument("--decode-graphs", action=argparse.BooleanOptionalAction,
                   default=None if env("DECODE_GRAPHS") is None else env_flag("DECODE_GRAPHS", False),
                   help="run Generate steps that only decode through the staged decode step: with dense layers "
                        "on a GPU, each stage between two MoE layers' expert calls is a CUDA graph "
                        "(env MOE_DECODE_GRAPHS; default: on when the dense layers are on a GPU)")


def batching_config_from_args(args: argparse.Namespace) -> BatchingConfig:
    """Flags -> config; ValueError names a limit that is not positive."""
    config = BatchingConfig(
        batching=args.batching, overlap=args.overlap, overlap_min_tokens=args.overlap_min_tokens,
        max_batch_tokens=args.max_batch_tokens,
        max_queue_delay_ms=args.max_queue_delay_ms, max_prefill_tokens=args.max_prefill_tokens,
        max_running_requests=args.max_running_requests, max_queued_requests=args.max_queued_requests,
        decode_graphs=args.decode_graphs,
    )
    for name in ("overlap_min_tokens", "max_batch_tokens", "max_prefill_tokens", "max_running_requests",
                 "max_queued_requests"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(config, name)} must be at least 1")
    if config.max_queue_delay_ms < 0:
        raise ValueError(f"--max-queue-delay-ms {config.max_queue_delay_ms} must be >= 0")
    return config


@dataclass
class Batching:
    """The running parts: None where batching is off (or, for Generate, where the model cannot generate)."""

    batcher: ForwardBatcher | None = None
    scheduler: GenerateScheduler | None = None

    def close(self) -> None:
        """Stop the batch threads and their micro-batch helpers (without waiting: see join)."""
        for part in (self.batcher, self.scheduler):
            if part is not None:
                part.close()
                part.pingpong.close()

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the batch threads to end. Call it off the event loop (a step may be waiting on it).

        A daemon thread still alive at interpreter exit can be torn down inside torch or gRPC code, which
        aborts the process (seen as SIGABRT after a clean shutdown)."""
        for part in (self.batcher, self.scheduler):
            if part is not None:
                part.join(timeout)


def uses_decode_graphs(config: BatchingConfig, device: torch.device) -> bool:
    """Whether Generate's decode-only steps go through core.decode_step for dense layers on `device`."""
    return device.type == "cuda" if config.decode_graphs is None else config.decode_graphs


def start_batching(config: BatchingConfig, model: SimpleMoEModel | CausalLM, experts: ExpertBackend,
                   tokenizer: TextTokenizer | None = None) -> Batching:
    """The Forward batcher and (for causal LMs) the Generate scheduler, each on its own thread."""
    if not config.batching:
        return Batching()
    def pingpong() -> PingPong:
        return PingPong(experts, config.overlap is not False, config.overlap_min_tokens)

    batcher = ForwardBatcher(model, pingpong(), config.max_batch_tokens, config.max_queue_delay_ms / 1000,
                             config.max_queued_requests)
    scheduler = None
    if isinstance(model, CausalLM):
        limits = SchedulerLimits(config.max_running_requests, config.max_queued_requests, config.max_prefill_tokens)
        scheduler = GenerateScheduler(model, pingpong(), tokenizer, limits,
                                      decode_graphs=uses_decode_graphs(config, model.device))
    return Batching(batcher, scheduler)
