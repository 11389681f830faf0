"""moe-serve benchmarks: `python -m benchmarks.run` (what `make bench` runs); see docs/benchmarks.md."""

from moe_serve.process.openmp import keep_spin_short

# The benchmark's own process plays the gateway: its OpenMP waits as the gateway's do (process/openmp.py),
# and the torch RPC workers it starts inherit the same setting, so both sides get the same tuning.
keep_spin_short()
