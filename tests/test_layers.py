"""The package's layers: imports run one way, from the services down to the core, and never in a loop.

    process   leaf: env, threads, devices, malloc, console; imports nothing of ours
    core      plain torch math (and the model description it computes with)
    model     what a checkpoint is: config, reader, tensor shapes, loader, placement, synthetic, tokenizer
    rpc       the gRPC shell both services share: server, edge, options, errors, codec, shared memory, ids
    observability   metrics, collectors, logs
    gateway, expert_server   the two services (neither imports the other)
    tools     the moe-serve CLI (may use everything)

The layer test reads imports as text (TYPE_CHECKING ones too: a loop of names is a loop for the reader).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "moe_serve"
CLIENT = Path(__file__).resolve().parents[1] / "client" / "moe_client"

# Layer -> the layers of ours it may import (besides itself). moe_client (the light client) is below all.
ALLOWED: dict[str, set[str]] = {
    "process": set(),
    "core": set(),  # plain torch: the math imports nothing of ours but its own description
    "model": {"process", "core"},
    "rpc": {"process", "core", "model"},
    "observability": {"process", "core", "model", "rpc"},
    "gateway": {"process", "core", "model", "rpc", "observability"},
    "expert_server": {"process", "core", "model", "rpc", "observability"},
    "openai_api": {"process", "core", "model", "rpc", "observability"},  # HTTP front end, gRPC to the gateway
    "tools": {"process", "core", "model", "rpc", "observability", "gateway", "expert_server"},
    "": {"process"},  # moe_serve/__init__.py
}


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `path`, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "moe_serve":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else ""


def _modules() -> dict[str, Path]:
    return {_module_of(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_subpackage_is_a_known_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    layers = set(ALLOWED) - {""}
    assert packages == layers, f"layers without a rule (add them to ALLOWED): {packages ^ layers}"
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not top, f"modules outside every layer: {top}"


def test_imports_run_down_the_layers():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        here = _layer(module)
        for line, target in _imports(path):
            there = _layer(target)
            ours = target in modules or target.rpartition(".")[0] in modules
            if there is None or there in (here, "") or not ours:
                continue  # not ours, the same layer, or the package root (its version)
            if there not in ALLOWED[here]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here or 'moe_serve'}) imports {target} "
                             f"({there or 'moe_serve'})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps = set()
        for _, target in _imports(path):
            if target in modules:
                deps.add(target)
            elif target.rpartition(".")[0] in modules:  # from pkg import name: the package itself
                deps.add(target.rpartition(".")[0])
        graph[module] = deps - {module}
    return graph


def test_no_import_loops():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (loop := visit(dep)):
                return loop
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (loop := visit(node)):
            pytest.fail("import loop: " + " -> ".join(loop))


def test_the_client_package_holds_no_server_code():
    """moe_client is what callers install: no servicers, no server credentials, no torch."""
    for path in CLIENT.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "moe_serve"))
        assert not heavy, f"{path.name} imports {heavy}"
        calls = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        server_side = sorted(c for c in calls if c.endswith("_rpc_method_handler") or c.startswith("ssl_server"))
        assert not server_side, f"{path.name} builds servers: {server_side}"


@pytest.mark.parametrize("module", ["moe_serve.rpc.options", "moe_serve.process.env", "moe_serve.core.spec",
                                    "moe_serve.model.config", "moe_serve.model.placement",
                                    "moe_serve.openai_api.main"])
def test_light_modules_do_not_load_torch(module):
    """Flags, options and descriptions import without torch (tools and option parsing stay quick)."""
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, f"importing {module} loads torch"
