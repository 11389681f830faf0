"""`moe-openai`: the OpenAI-compatible HTTP API in front of a gateway (a process of its own: docs/http-api.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

import uvicorn

from moe_client.security import TLSFiles
from moe_serve.model.chat_template import ChatTemplate
from moe_serve.model.config import ConfigError, spec_from_config
from moe_serve.model.tokenizer import TextTokenizer
from moe_serve.observability.logs import configure_logging
from moe_serve.openai_api.app import FrontEnd
from moe_serve.openai_api.params import ModelLimits
from moe_serve.process.console import summary
from moe_serve.process.env import env


def build_parser() -> argparse.ArgumentParser:
    """Flags of moe-openai; each default can come from MOE_<FLAG>."""
    p = argparse.ArgumentParser(prog="moe-openai", description="OpenAI-compatible HTTP API for a moe-serve gateway.")
    p.add_argument("--gateway", default=env("GATEWAY", "127.0.0.1:50050"),
                   help="the gateway's gRPC address (env MOE_GATEWAY; default 127.0.0.1:50050)")
    p.add_argument("--checkpoint", default=env("CHECKPOINT"), required=env("CHECKPOINT") is None,
                   help="the checkpoint the gateway serves: its tokenizer.json, chat template and context length "
                        "(env MOE_CHECKPOINT)")
    p.add_argument("--host", default=env("HTTP_HOST", "0.0.0.0"), help="address to bind (env MOE_HTTP_HOST)")
    p.add_argument("--port", type=int, default=int(env("HTTP_PORT", "8000")),
                   help="HTTP port (env MOE_HTTP_PORT; default 8000)")
    p.add_argument("--served-model-name", default=env("SERVED_MODEL_NAME"),
                   help="the `model` clients name (env MOE_SERVED_MODEL_NAME; default: the checkpoint directory's "
                        "name)")
    p.add_argument("--default-max-tokens", type=int, default=int(env("DEFAULT_MAX_TOKENS", "1024")),
                   help="chat completions without max_tokens generate up to the context, at most this many "
                        "(env MOE_DEFAULT_MAX_TOKENS; default 1024)")
    p.add_argument("--request-timeout", type=float, default=float(env("REQUEST_TIMEOUT", "600")),
                   help="deadline of each Generate stream in seconds (env MOE_REQUEST_TIMEOUT; default 600)")
    p.add_argument("--gateway-tls-ca", default=env("GATEWAY_TLS_CA"),
                   help="CA certificate (PEM) of the gateway; turns TLS on toward it (env MOE_GATEWAY_TLS_CA)")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"),
                   help="logging level; INFO logs every HTTP request (env MOE_LOG_LEVEL; default INFO)")
    return p


def front_end(args: argparse.Namespace) -> FrontEnd:
    """Read the checkpoint's config, tokenizer and chat template; ValueError names what is wrong."""
    path = Path(args.checkpoint)
    try:
        spec = spec_from_config(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError) as err:
        raise ValueError(f"--checkpoint {path}: {err}") from err
    if not spec.has_attention:
        raise ValueError(f"--checkpoint {path}: model {spec.model_type} cannot generate (no embeddings or lm_head)")
    limits = ModelLimits(args.served_model_name or path.resolve().name, spec.vocab_size,
                         spec.max_position_embeddings, args.default_max_tokens)
    return FrontEnd(args.gateway, limits, TextTokenizer.from_checkpoint(path), ChatTemplate.from_checkpoint(path),
                    TLSFiles.of(args.gateway_tls_ca, None, None), args.request_timeout)


class _Server(uvicorn.Server):
    """uvicorn, but a SIGTERM / SIGINT that stopped it gracefully ends in exit status 0 like the other services
    (uvicorn raises the signal again after its graceful stop, which exits 143)."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def main(argv: list[str] | None = None) -> int:
    """Entry point of moe-openai."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        api = front_end(args)
    except (ValueError, ConfigError) as err:
        print(f"moe-openai: error: {err}", file=sys.stderr)
        return 2
    print(summary("OpenAI API", [
        ("HTTP", f"http://{args.host}:{args.port}/v1 (completions, chat/completions, models; /health)"),
        ("model", f"{api.limits.name} (context {api.limits.context}, tokenizer "
                  f"{'yes' if api.tokenizer else 'no'}, chat template {'yes' if api.template else 'no'})"),
        ("gateway", args.gateway),
    ]), flush=True)
    config = uvicorn.Config(api.app(), host=args.host, port=args.port, log_level=args.log_level.lower(),
                            access_log=logging.getLogger().isEnabledFor(logging.INFO), timeout_graceful_shutdown=10)
    _Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
