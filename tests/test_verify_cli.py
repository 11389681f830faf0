"""`moe-serve verify` as a user runs it: one error line for a wrong path or a dead gateway, and a tolerance
chosen from the dtype the cluster serves in (a bf16 cluster passed nothing against the 1e-5 of fp32)."""

import subprocess

import pytest

from tests.support import BIN, ROOT
from tests.support.ports import free_port


def _verify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "moe-serve"), "verify", *args], capture_output=True, text=True, timeout=300)


def test_a_wrong_path_or_a_dead_gateway_is_one_error_line(tiny_checkpoint, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    for args, expected in (
            (("--gateway", dead, "--checkpoint", str(tmp_path / "nowhere")), "moe-serve verify: error: "),
            (("--gateway", dead, "--checkpoint", str(tiny_checkpoint)),
             f"moe-serve verify: error: gateway {dead}: UNAVAILABLE: ")):
        result = _verify(*args)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected) and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("dtype,wire_dtype,tolerance", [("float32", "float32", "1e-05"),
                                                        ("bfloat16", "float32", "5e-02"),
                                                        ("float32", "float8_e4m3", "1e-01")])
def test_the_tolerance_follows_the_served_dtype(cluster, tiny_checkpoint, dtype, wire_dtype, tolerance):
    servers = [cluster.expert_server(tiny_checkpoint, experts=e, dtype=dtype) for e in ("0-3", "4-7")]
    gateway = cluster.gateway(tiny_checkpoint, servers, wire_dtype=wire_dtype)
    result = _verify("--gateway", gateway, "--checkpoint", str(tiny_checkpoint), "--tokens", "256")
    served = "float8_e4m3" if wire_dtype == "float8_e4m3" else dtype
    assert f"(served in {served})" in result.stdout and f"tolerance {tolerance} for {served}" in result.stdout, result
    assert result.returncode == 0 and "OK" in result.stdout, result


def test_readme_states_what_the_demo_prints():
    """README said the demo's error is 0 where verify printed 1.6e-06: it must quote verify's fp32 tolerance."""
    from moe_serve.tools.cli import TOLERANCES

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "max abs error 0 in fp32" not in readme
    assert f"it passes under {TOLERANCES['float32']:.0e}" in readme


def test_lint_skips_what_pip_install_leaves(tmp_path):
    """`pip install ./client` leaves client/build/ (a copy of the package); `make lint` must not check it."""
    import shutil

    shutil.copy(ROOT / "ruff.toml", tmp_path / "ruff.toml")
    (tmp_path / "client" / "build" / "lib").mkdir(parents=True)
    (tmp_path / "client" / "build" / "lib" / "copy.py").write_text("import os\nx=1;y=2\n")  # lint errors
    (tmp_path / "client" / "ok.py").write_text("X = 1\n")
    ruff = [str(BIN / "ruff"), "check", "--config", str(tmp_path / "ruff.toml"), "client"]
    assert subprocess.run(ruff, cwd=tmp_path, capture_output=True, text=True).returncode == 0
    (tmp_path / "client" / "bad.py").write_text("import os\n")  # outside build/: still checked
    assert subprocess.run(ruff, cwd=tmp_path, capture_output=True, text=True).returncode == 1
