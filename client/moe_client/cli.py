"""`moe-client`: talk to a moe-serve gateway from the shell."""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc
import numpy as np

from moe_client import wire
from moe_client.client import GatewayClient
from moe_client.wire import dtype_from_name

RULE = "=" * 80


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not comma-separated integers") from err
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"shape {text!r} needs positive dimensions")
    return shape


def _wire_dtype(text: str) -> str:
    try:
        dtype_from_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags; every flag also reads MOE_<FLAG> from the environment where noted."""
    parser = argparse.ArgumentParser(prog="moe-client", description="Call a moe-serve gateway over gRPC.")
    parser.add_argument("--address", default=os.environ.get("MOE_GATEWAY", "127.0.0.1:50050"),
                        help="gateway host:port (env MOE_GATEWAY; default %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-call deadline in seconds (default 60)")
    sub = parser.add_subparsers(dest="command", required=True)

    health = sub.add_parser("health", help="print the gateway's health status")
    health.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for SERVING instead of asking once")
    sub.add_parser("info", help="print the model and the expert servers behind the gateway")

    fwd = sub.add_parser("forward", help="send hidden states through the MoE stack")
    src = fwd.add_mutually_exclusive_group()
    src.add_argument("--shape", type=_shape, default=None,
                     help="random normal input of this shape, e.g. 2,10,512 (default: batch 2, seq 10, hidden size)")
    src.add_argument("--input", help="read the input from this .npy file")
    fwd.add_argument("--seed", type=int, default=None, help="seed for the random input (default: fresh)")
    fwd.add_argument("--output", help="write the output to this .npy file")
    fwd.add_argument("--dtype", type=_wire_dtype, default="float32",
                     help="wire dtype of the request: float32, bfloat16, float16 (default float32)")
    fwd.add_argument("--repeat", type=int, default=1, help="send the request this many times, report each time")
    return parser


def _print_info(client: GatewayClient) -> None:
    info = client.model_info()
    print(f"Model: {info.model_type}  fingerprint {info.model_fingerprint}")
    print(f"  hidden {info.hidden_size}, {info.num_layers} layers, MoE layers {list(info.moe_layers)}, "
          f"{info.num_experts} experts, top-{info.top_k}, dense dtype {info.dense_dtype}")
    print(f"Expert servers ({len(info.servers)}):")
    for server in info.servers:
        print(f"  {server.address}  devices {', '.join(server.devices)}  experts {'; '.join(server.owned)}")


def _forward(client: GatewayClient, args: argparse.Namespace) -> None:
    if args.input:
        hidden = np.load(args.input).astype(np.float32, copy=False)
    else:
        shape = args.shape or (2, 10, client.model_info().hidden_size)
        hidden = np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32)
    print(RULE)
    print(f"Gateway: {client.address}")
    print(RULE)
    print(f"Input shape: {list(hidden.shape)} ({args.dtype} on the wire)")
    print("Running distributed inference...")
    output = None
    for i in range(args.repeat):
        start = time.perf_counter()
        reply = client.forward_raw(hidden, args.dtype)
        elapsed = time.perf_counter() - start
        output = wire.decode(reply.hidden, "hidden").astype(np.float32, copy=False)
        print(f"  run {i + 1}: {elapsed * 1e3:.2f} ms round trip "
              f"(gateway {reply.total_seconds * 1e3:.2f} ms, experts {reply.expert_seconds * 1e3:.2f} ms)")
    print(f"Output shape: {list(output.shape)}")
    print(f"Output stats: mean {output.mean():+.5f}, std {output.std():.5f}, finite {bool(np.isfinite(output).all())}")
    if args.output:
        np.save(args.output, output)
        print(f"Output written to {args.output}")
    print("Distributed inference complete!")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moe-client`."""
    args = build_parser().parse_args(argv)
    with GatewayClient(args.address, timeout=args.timeout) as client:
        try:
            if args.command == "health":
                if args.wait > 0:
                    client.wait_until_serving(args.wait)
                print(client.health())
            elif args.command == "info":
                _print_info(client)
            else:
                _forward(client, args)
        except grpc.RpcError as err:
            print(f"moe-client: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
        except TimeoutError as err:
            print(f"moe-client: {err}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
