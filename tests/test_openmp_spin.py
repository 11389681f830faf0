"""OpenMP's spin after a parallel region is short in our processes (process/openmp.py), unless the user says.

libgomp prints the settings it runs with when OMP_DISPLAY_ENV=VERBOSE, once, as torch loads it: so these
tests read what libgomp itself took, in a fresh process, not only what we put in the environment."""

import os
import re
import subprocess
import sys

import pytest

from moe_serve.process.openmp import SPIN_COUNT, keep_spin_short
from tests.support import ROOT

_PATH = os.pathsep.join(str(ROOT / part) for part in ("services", "client", ""))


def _libgomp_spin(code: str, **env: str) -> str:
    """GOMP_SPINCOUNT as libgomp took it in `python -c code`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**clean, "PYTHONPATH": _PATH, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", out.stderr)
    if found is None:
        pytest.skip("this torch does not run on GNU libgomp (no GOMP_SPINCOUNT in its OMP_DISPLAY_ENV)")
    return found.group(1)


def test_spin_is_set_only_where_the_user_set_nothing():
    environ: dict[str, str] = {}
    assert keep_spin_short(environ) and environ == {"GOMP_SPINCOUNT": str(SPIN_COUNT)}
    for theirs in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        environ = dict(theirs)
        assert not keep_spin_short(environ) and environ == theirs


def test_libgomp_takes_our_spin_in_a_process_that_imports_us_first():
    # As our services' entry points do (moe-expert-server, moe-gateway: moe_serve before any torch)
    assert _libgomp_spin("import moe_serve.expert_server.main") == str(SPIN_COUNT)
    assert _libgomp_spin("import benchmarks, torch") == str(SPIN_COUNT)  # the benchmarks' gateway-role process
    assert _libgomp_spin("import moe_serve, torch", GOMP_SPINCOUNT="5") == "5"  # the user's own: kept
    assert _libgomp_spin("import torch, moe_serve") != str(SPIN_COUNT)  # torch first: too late (the docs say so)
