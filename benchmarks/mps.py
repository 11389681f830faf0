"""CUDA's Multi-Process Service for one benchmark run: the gateway and expert server processes share one context.

Without MPS the driver time-slices the CUDA contexts of processes on one GPU, and a switch between them
costs ~150 us on the H200 (benchmarks/gpu_context_switch.py); a same-GPU expert call pays at least two.
Under MPS every client process's kernels go through one server's context and can run side by side.

`mps_daemon` starts a control daemon of its own (its pipe and log directories in a fresh folder, so only
processes that inherit this process's environment become its clients), exports that environment to the
processes started meanwhile (CUDA reads it when it starts: gpu_model runs itself again under it), and quits
the daemon afterwards. It changes no device setting: the compute
mode stays as it is (MPS is only exclusive when the compute mode is EXCLUSIVE_PROCESS, which it does not set).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CONTROL = "nvidia-cuda-mps-control"
SEARCH = ("/usr/local/nvidia/bin", "/usr/bin", "/usr/local/cuda/bin")


def control_program() -> str | None:
    """The MPS control program on PATH or in the driver's usual folders, or None."""
    found = shutil.which(CONTROL)
    if found:
        return found
    return next((str(Path(d) / CONTROL) for d in SEARCH if (Path(d) / CONTROL).exists()), None)


def _ask(program: str, env: dict, command: str) -> str:
    return subprocess.run([program], input=command + "\n", env=env, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def server_pids() -> list[str]:
    """The MPS servers that the daemon of this process's environment runs now (one appears once a client has
    started CUDA); [] when there is none."""
    program = control_program()
    if program is None or not os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        return []
    return _ask(program, dict(os.environ), "get_server_list").split()


@contextlib.contextmanager
def mps_daemon() -> Iterator[dict]:
    """Run an MPS control daemon for the children this process starts meanwhile (they inherit its
    environment); yields its state, which on exit also holds the tail of the daemon's log (it names each
    client that connected). CUDA reads the variables when it starts: start the work in a fresh process."""
    program = control_program()
    if program is None:
        raise SystemExit(f"--mps: {CONTROL} is not on PATH nor in {', '.join(SEARCH)}")
    root = Path(tempfile.mkdtemp(prefix="mps-"))
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(root / "log")}
    for d in env.values():
        Path(d).mkdir()
    full = {**os.environ, **env}
    subprocess.run([program, "-d"], env=full, check=True, timeout=30)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    state: dict = {"control": program, **env}
    try:
        yield state
    finally:
        _ask(program, full, "quit")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        log = root / "log" / "control.log"
        state["control_log_tail"] = log.read_text()[-2000:] if log.exists() else ""


def rerun_under_mps(module: str, out: str | None) -> None:
    """Run `python -m module` again with this process's arguments (less --mps, plus --mps-client) under a daemon
    of its own, add the daemon's log to its JSON `out`, and exit with its code. The run goes in a fresh process:
    CUDA reads the MPS variables when it starts, and imports (Triton's) may have started it here already."""
    argv = [a for a in sys.argv[1:] if a != "--mps"] + ["--mps-client"]
    with mps_daemon() as mps:
        code = subprocess.call([sys.executable, "-m", module, *argv])
    if out and Path(out).exists():  # the daemon's log, read once it quit, names each client
        data = json.loads(Path(out).read_text())
        data.setdefault("mps", {})["control_log_tail"] = mps.get("control_log_tail", "")
        Path(out).write_text(json.dumps(data, indent=2))
    raise SystemExit(code)


def client_state() -> dict:
    """For a --mps-client run that has started CUDA: the MPS servers now running for it (none: not under MPS)."""
    state = {"servers": server_pids(), "pipe": os.environ.get("CUDA_MPS_PIPE_DIRECTORY")}
    print(f"MPS servers: {state['servers'] or 'NONE (not under MPS)'}", flush=True)
    return state
