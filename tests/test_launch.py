"""The launcher stops services the way an operator does: one SIGTERM, then SIGKILL only past the timeout."""

import sys
import time

from tests.support.launch import ServiceProcess, stop_all

# Counts the SIGTERMs it gets (in its log), and exits 0 some time (argv[1] seconds) after the first: a graceful
# stop that takes a while, as a service's does. A second SIGTERM meanwhile would be counted.
GRACEFUL = """
import signal, sys, time
got = []
def on_term(*_):
    got.append(1)
    print("SIGTERM", len(got), flush=True)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while not got:
    time.sleep(0.01)
time.sleep(float(sys.argv[1]))
sys.exit(0)
"""


def _started(tmp_path, name: str, stop_seconds: float = 0.3) -> ServiceProcess:
    proc = ServiceProcess([sys.executable, "-c", GRACEFUL, str(stop_seconds)], tmp_path / f"{name}.log",
                          label=name).start()
    deadline = time.monotonic() + 30
    while "ready" not in proc.output():
        assert time.monotonic() < deadline and proc.alive, proc.output()
        time.sleep(0.01)
    return proc


def test_stop_all_sends_each_process_one_sigterm(tmp_path):
    # Later processes take longer to stop, so each is still stopping while stop_all waits for the one before.
    procs = [_started(tmp_path, f"p{i}", stop_seconds=0.5 * (i + 1)) for i in range(3)]
    assert stop_all(procs, timeout=30) == [0, 0, 0]
    for p in procs:
        assert p.output().count("SIGTERM") == 1, p.output()


def test_a_restarted_process_gets_its_own_sigterm(tmp_path):
    proc = _started(tmp_path, "again")
    assert proc.stop(30) == 0
    proc.start()
    while proc.output().count("ready") < 2:
        time.sleep(0.01)
    assert proc.stop(30) == 0
    assert proc.output().count("SIGTERM 1") == 2 and "SIGTERM 2" not in proc.output(), proc.output()


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path):
    proc = ServiceProcess([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                          tmp_path / "stubborn.log", label="stubborn").start()
    while "ready" not in proc.output():
        time.sleep(0.01)
    assert proc.stop(timeout=0.5) == -9
