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
from moe_client.ownership import format_ownership, from_messages
from moe_client.security import TLSFiles
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


def _address(text: str) -> str:
    """host:port, [v6]:port or unix:PATH; a bare host would make grpc dial port 443."""
    if text.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or (text.count(":") > 1 and not host.endswith("]")):
        raise argparse.ArgumentTypeError(f"{text!r} has no port: give host:port, e.g. {text.strip('[]')}:50050 "
                                         "(grpc would dial port 443)")
    return text


def _at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from err
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value
    return parse


_positive, _count = _at_least(1), _at_least(0)


def _wire_dtype(text: str) -> str:
    try:
        dtype_from_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags; every flag also reads MOE_<FLAG> from the environment where noted."""
    parser = argparse.ArgumentParser(prog="moe-client", description="Call a moe-serve gateway over gRPC.")
    parser.add_argument("--address", type=_address, default=os.environ.get("MOE_GATEWAY", "127.0.0.1:50050"),
                        help="gateway host:port (env MOE_GATEWAY; default %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-call deadline in seconds (default 60)")
    parser.add_argument("--tls-ca", default=os.environ.get("MOE_TLS_CA"),
                        help="CA certificate (PEM) to verify the gateway with; turns TLS on (env MOE_TLS_CA)")
    parser.add_argument("--tls-cert", default=os.environ.get("MOE_TLS_CERT"),
                        help="client certificate (PEM) for mutual TLS (env MOE_TLS_CERT)")
    parser.add_argument("--tls-key", default=os.environ.get("MOE_TLS_KEY"),
                        help="private key (PEM) of --tls-cert (env MOE_TLS_KEY)")
    parser.add_argument("--token", default=os.environ.get("MOE_TOKEN"),
                        help="bearer token for a gateway started with --auth-token (env MOE_TOKEN)")
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
                     help="wire dtype of the request: float32, bfloat16, float16, float8_e4m3 (default float32)")
    fwd.add_argument("--repeat", type=_positive, default=1, help="send the request this many times, report each time")

    gen = sub.add_parser("generate", help="generate tokens after a prompt, printed as they arrive")
    gen.add_argument("prompt", nargs="?", help="prompt text (the checkpoint needs a tokenizer.json)")
    gen.add_argument("--ids", type=_ids, help="prompt as comma-separated token ids instead of text")
    gen.add_argument("--max-new-tokens", type=_positive, default=32,
                     help="tokens to generate at most, 1 or more (default 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-k", type=_count, default=0, help="sample from the k most likely tokens (0 = all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--seed", type=_count, default=None, help="sampler seed, for reproducible sampling")
    gen.add_argument("--stop", type=_ids, default=(), help="comma-separated stop token ids")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-sequence tokens")
    return parser


def _ids(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"token ids {text!r} are not comma-separated integers") from err


def _print_info(client: GatewayClient) -> None:
    info = client.model_info()
    print(f"Model: {info.model_type}  fingerprint {info.model_fingerprint}")
    print(f"  hidden {info.hidden_size}, {info.num_layers} layers, MoE layers {list(info.moe_layers)}, "
          f"{info.num_experts} experts, top-{info.top_k}, dense dtype {wire.dtype_name(info.dense_dtype)}")
    if info.vocab_size:
        print(f"  causal LM: vocab {info.vocab_size}, context {info.max_position_embeddings}, "
              f"end-of-sequence ids {list(info.eos_token_ids)}, text prompts {'yes' if info.has_tokenizer else 'no'}")
    print(f"Expert servers ({len(info.servers)}):")
    for server in sorted(info.servers, key=lambda s: (s.name or s.address, s.address)):
        owned = "; ".join(format_ownership(from_messages(server.owned)))
        dtype = f" ({wire.dtype_name(server.compute_dtype)})" if server.compute_dtype else ""
        print(f"  {server.name or server.address} at {server.address}  devices {', '.join(server.devices)}{dtype}  "
              f"experts {owned}")


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


def _generate(client: GatewayClient, args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.ids is None):
        print("moe-client generate: give a prompt text or --ids, not both", file=sys.stderr)
        return 2
    last = None
    for token in client.generate(args.prompt if args.ids is None else args.ids, args.max_new_tokens,
                                 args.temperature, args.top_k, args.top_p, args.seed, args.stop, args.ignore_eos):
        # Text when the checkpoint has a tokenizer, else the ids themselves.
        print(token.text if token.text is not None else f"{token.token_id} ", end="", flush=True)
        last = token
    print()
    rate = last.generated_tokens / last.total_seconds if last.total_seconds > 0 else float("inf")
    print(f"[finish: {last.finish_reason}; prompt {last.prompt_tokens} tokens, generated {last.generated_tokens} "
          f"in {last.total_seconds:.2f} s ({rate:.1f} tokens/s), waiting on experts {last.expert_seconds:.2f} s]",
          file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moe-client`."""
    args = build_parser().parse_args(argv)
    try:
        tls = TLSFiles.of(args.tls_ca, args.tls_cert, args.tls_key)
        client = GatewayClient(args.address, timeout=args.timeout, tls=tls, token=args.token)
    except ValueError as err:  # a missing or malformed certificate file, named
        print(f"moe-client: {err}", file=sys.stderr)
        return 2
    with client:
        try:
            if args.command == "health":
                if args.wait > 0:
                    client.wait_until_serving(args.wait)
                print(client.health())
            elif args.command == "info":
                _print_info(client)
            elif args.command == "generate":
                return _generate(client, args)
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
