"""moe-serve's scripts. Those that use the shared test-support package (tests.support) run as modules
from the repository root: `python -m scripts.soak`."""
