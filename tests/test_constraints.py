"""constraints.txt pins every run-time dependency of the two packages, their dependencies included, and
development runs exactly those versions: the images install with the same file, so what the tests ran is
what ships. `moe-serve --version` names them."""

import re
import subprocess
import sys
from importlib.metadata import distribution, version

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support import ROOT


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, ver = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[key(name)] = ver
    return pins


def runtime_closure() -> set[str]:
    """moe-serve and moe-client and what they need at run time, as installed (no extras)."""
    env, seen, todo = {**default_environment(), "extra": ""}, set(), ["moe-serve", "moe-client"]
    while todo:
        name = key(todo.pop())
        if name not in seen:
            seen.add(name)
            reqs = [Requirement(r) for r in distribution(name).requires or []]
            todo += [r.name for r in reqs if r.marker is None or r.marker.evaluate(env)]
    return seen - {"moe-serve", "moe-client"}


def test_constraints_pin_every_runtime_dependency_at_the_installed_version():
    pins = pinned()
    closure = runtime_closure()
    assert sorted(closure - set(pins)) == [], "run-time dependencies missing from constraints.txt"
    # A CUDA or CPU build of torch (2.13.0+cpu) is the pinned 2.13.0: == ignores the local label.
    wrong = {name: (pins[name], version(name)) for name in closure
             if Version(version(name)).public != Version(pins[name]).public}
    assert wrong == {}, "installed versions differ from constraints.txt (run make setup)"


def test_version_flag_names_the_pinned_runtime():
    out = subprocess.run([sys.executable, "-m", "moe_serve.tools.cli", "--version"], capture_output=True,
                         text=True, check=True, timeout=120).stdout
    lines = dict(line.strip().rsplit(" ", 1) for line in out.splitlines() if not line.strip().startswith("torch cuda"))
    assert lines["moe-serve"] == version("moe-serve")
    for name in ("grpcio", "protobuf", "numpy", "torch"):
        assert Version(lines[name]).public == pinned()[name]
