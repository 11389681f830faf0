"""The one launcher of subprocesses: moe-serve's expert servers and gateways, and any helper process.

    server = launch("expert-server", tmp / "w1.log", checkpoint=ckpt, experts="0-3", name="w1")
    gw = launch("gateway", tmp / "gw.log", checkpoint=ckpt, servers=[server.address]).wait_ready()
    ...
    assert gw.stop() == 0, gw.output()

launch() builds the command line from keyword options (checkpoint=..., rpc_timeout=5 -> --rpc-timeout 5;
True/False -> --flag/--no-flag; None -> left out; a list -> comma-separated), picks a free port unless
told one, and starts the process. A ServiceProcess writes stdout and stderr to its log file (appending,
so a restart keeps the earlier run's lines) and can be waited on until SERVING, signalled (SIGKILL: a
crash), started again on the same address, stopped (SIGTERM, then SIGKILL), and measured (/proc memory, CPU).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tests.support import BIN
from tests.support.ports import free_port
from tests.support.waiting import wait_serving

# program -> (console script, module): `python -m module` unless console_script=True (the real entry point)
PROGRAMS = {"expert-server": ("moe-expert-server", "moe_serve.expert_server.main"),
            "gateway": ("moe-gateway", "moe_serve.gateway.main"),
            "openai": ("moe-openai", "moe_serve.openai_api.main")}  # HTTP: wait with tests.support.http.wait_http

# SIGTERM to the child when the thread that started it ends (setpriv --pdeathsig: PR_SET_PDEATHSIG), so
# no gigabyte server outlives a crashed benchmark. setpriv rather than a preexec_fn, which would make
# Python fork() a large, gRPC-threaded process. Only for processes started on a thread that lives as long
# as they should: a restart from a short-lived thread would be killed when that thread ends.
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "SIGTERM", "--"]


def flags(options: Mapping[str, object]) -> list[str]:
    """Command-line flags of keyword options: foo_bar=1 -> --foo-bar 1; True -> --foo-bar; False ->
    --no-foo-bar (argparse.BooleanOptionalAction); None -> nothing; a list or tuple -> comma-separated."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            out += [flag, ",".join(map(str, value))]
        else:
            out += [flag, str(value)]
    return out


def proc_status(pid: int, fields: Iterable[str] = ("VmRSS",)) -> dict[str, int]:
    """`fields` of /proc/PID/status (VmRSS, RssAnon, RssFile, VmHWM, ...) in bytes; {} once the process is gone."""
    wanted, out = set(fields), {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        if key in wanted:
            out[key] = int(value.split()[0]) * 1024
    return out


class ServiceProcess:
    """One subprocess with its command line, log file and (for a service) address; restartable.

    `wrapper` goes before the command (["ip", "netns", "exec", NS], an unshare): the process signalled is
    the wrapper, which should exec the command. `env` is added to this process's environment (with
    PYTHONUNBUFFERED=1, so the log is whole at any time); `cpus` pins the process (sched_setaffinity, set
    before it loads anything, so its threads inherit it). Without a log file, stdout goes to `stdout` and
    stderr to this process's stderr.
    """

    def __init__(self, argv: Sequence[str], log: Path | None = None, *, label: str = "", address: str | None = None,
                 env: Mapping[str, str] | None = None, cpus: set[int] | None = None, wrapper: Sequence[str] = (),
                 die_with_parent: bool = False, stdout=subprocess.DEVNULL):
        self.argv, self.log, self.address = list(argv), log, address
        self.label = label or Path(argv[0]).name
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cpus, self.stdout = cpus, stdout
        self.command = [*(DIE_WITH_PARENT if die_with_parent and shutil.which("setpriv") else []), *wrapper,
                        *self.argv]
        self.popen: subprocess.Popen | None = None
        self._terminated = False  # SIGTERM already sent to the current run

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def start(self) -> ServiceProcess:
        """Start (or start again, after it ended) with the same command line, appending to the log."""
        if self.alive:
            raise RuntimeError(f"{self.label} is already running (pid {self.pid})")
        self._terminated = False
        if self.log is None:
            self.popen = subprocess.Popen(self.command, stdout=self.stdout, env=self.env, text=True)
        else:
            with open(self.log, "a") as log:
                self.popen = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        if self.cpus:
            os.sched_setaffinity(self.popen.pid, self.cpus)
        return self

    def output(self) -> str:
        """Everything the process wrote to its log so far ('' without a log file)."""
        return self.log.read_text(errors="replace") if self.log is not None and self.log.exists() else ""

    def check_running(self) -> None:
        """RuntimeError, with the end of the log, if the process has exited."""
        if not self.alive:
            code = self.returncode
            raise RuntimeError(f"{self.label} exited with {code}" + (f"; {self.log}:\n{self.output()[-3000:]}"
                                                                     if self.log is not None else ""))

    def wait_ready(self, timeout: float = 120.0) -> ServiceProcess:
        """Block until the service answers SERVING (grpc.health.v1). RuntimeError at once if it exits meanwhile;
        TimeoutError after `timeout` seconds, having stopped it. Either error ends with its log."""
        if self.address is None:
            raise ValueError(f"{self.label} has no address to probe")
        try:
            wait_serving(self.address, timeout, self.check_running)
        except TimeoutError as err:
            self.stop(10)
            raise TimeoutError(f"{err}; {self.log}:\n{self.output()[-3000:]}") from None
        return self

    def signal(self, sig: int) -> None:
        """Send `sig` if running (SIGKILL: a crash; SIGTERM: a graceful stop)."""
        if self.alive:
            self.popen.send_signal(sig)

    def kill(self) -> int | None:
        """SIGKILL and reap; the exit status (None if never started)."""
        if self.popen is None:
            return None
        self.signal(signal.SIGKILL)
        return self.popen.wait(10)

    def wait(self, timeout: float) -> int:
        """Wait for exit; the exit status (negative: killed by that signal). TimeoutExpired if still running."""
        return self.popen.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM, once per start: a service that has begun its graceful stop must not get a second one,
        which could arrive after its event loop has closed (and restored the default action) and kill it."""
        if not self._terminated:
            self._terminated = True
            self.signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (unless already sent), then SIGKILL if it has not exited after `timeout` seconds; the exit
        status (None if never started)."""
        if self.popen is None:
            return None
        self.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def stop_clean(self, timeout: float = 30.0) -> str:
        """stop(), which must end in exit status 0 (AssertionError with the log otherwise); the whole log."""
        code, out = self.stop(timeout), self.output()
        assert code == 0, f"{self.label} exited with {code}:\n{out}"
        return out

    def memory(self, *fields: str) -> dict[str, int]:
        """Memory figures of the running process from /proc/PID/status, in bytes (default: VmRSS)."""
        return proc_status(self.pid, fields or ("VmRSS",)) if self.alive else {}

    def rss_mib(self) -> float:
        """Resident memory in MiB, 0 when not running."""
        return self.memory("VmRSS").get("VmRSS", 0) / 2**20

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(program: str, log: Path | None, *, host: str = "127.0.0.1", port: int | None = None,
           args: Sequence[str] = (), console_script: bool = False, start: bool = True, label: str = "",
           env: Mapping[str, str] | None = None, cpus: set[int] | None = None, wrapper: Sequence[str] = (),
           die_with_parent: bool = False, **options) -> ServiceProcess:
    """A moe-serve service process: `program` is "expert-server" or "gateway", `options` its flags
    (checkpoint=..., experts="0-3", servers=[...], log_level="WARNING", merge_calls=False, ...), `args` any
    further raw arguments. On `host` (a "unix:PATH" host is the address itself) and `port` (default: a
    free one, fixed for restarts). `console_script` runs the installed entry point (moe-expert-server)
    rather than `python -m`. Started unless start=False; wait_ready() blocks until it serves."""
    script, module = PROGRAMS[program]
    command = [str(BIN / script)] if console_script else [sys.executable, "-m", module]
    if host.startswith("unix:"):
        address, where = host, {"host": host}
    else:
        port = free_port(host) if port is None else port
        address, where = f"{host}:{port}", {"host": host, "port": port}
    service = ServiceProcess([*command, *flags(options), *flags(where), *args], log,
                             label=label or str(options.get("name") or program), address=address, env=env,
                             cpus=cpus, wrapper=wrapper, die_with_parent=die_with_parent)
    return service.start() if start else service


def stop_all(processes: Iterable[ServiceProcess], timeout: float = 30.0) -> list[int | None]:
    """SIGTERM to every process first (they drain side by side), then stop() each; their exit statuses."""
    processes = list(processes)
    for p in processes:
        p.terminate()
    return [p.stop(timeout) for p in processes]


def gpu_expert_servers(processes: list, checkpoint, tmp_path: Path, dtype: str,
                       experts: Sequence[str] = ("0-3", "4-7")) -> list[ServiceProcess]:
    """Expert server processes on cuda:0, one per entry of `experts`, started side by side and ready (CUDA
    refuses to open an IPC handle in the process that made it, so they cannot run in the test's process);
    added to `processes` for the fixture to stop."""
    servers = [launch("expert-server", tmp_path / f"server{i}.log", start=False, checkpoint=checkpoint,
                      experts=e, devices="cuda:0", dtype=dtype, log_level="WARNING")
               for i, e in enumerate(experts)]
    processes.extend(servers)
    for server in servers:
        server.start()
    for server in servers:
        server.wait_ready(120)
    return servers
