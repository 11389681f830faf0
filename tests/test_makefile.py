"""The Makefile: every target defined once and described, so `make help` lists them all."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = re.compile(r"^([a-z][a-z-]*):", re.M)


def _targets() -> list[str]:
    return TARGET.findall((ROOT / "Makefile").read_text())


def test_every_target_is_defined_once_and_phony():
    targets = _targets()
    twice = sorted({t for t in targets if targets.count(t) > 1})
    assert not twice, f"targets defined more than once (make keeps the last recipe): {twice}"
    phony = set(re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split())
    assert set(targets) <= phony, f"targets missing from .PHONY: {sorted(set(targets) - phony)}"


def test_help_lists_every_target_with_its_comment():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.strip()}
    assert sorted(listed) == sorted(_targets()), "make help must list every target: give each a ## comment"
    assert all(len(text) > 10 for text in listed.values()), listed
