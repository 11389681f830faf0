"""Generate the Python stubs of protos/ into a package, with imports rewritten to that package.

protoc names generated imports after the .proto path (``from moe.v1 import tensor_pb2``); the
stubs live in ``moe_client.pb``, so those imports are rewritten to ``from moe_client.pb import``.
Usage: python scripts/gen_protos.py [OUT_DIR]   (default client/moe_client/pb)
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = "moe_client.pb"
DEFAULT_OUT = ROOT / "client" / "moe_client" / "pb"
_IMPORT = re.compile(r"^from moe\.v1 import (\w+)", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto under protos/ and write the rewritten stubs to out_dir."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *protos]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {protos}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            text = _IMPORT.sub(rf"from {PACKAGE} import \1", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    init = out_dir / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC stubs of protos/moe/v1 (make protos)."""\n')
    return [init, *written]


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
