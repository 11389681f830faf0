"""moe-serve benchmarks: `python -m benchmarks.run` (what `make bench` runs); see docs/benchmarks.md."""

# Importing moe_serve first keeps OpenMP's spin short (process/openmp.py) in the benchmark's own process, which
# plays the gateway, and in the torch RPC workers it starts, which inherit it: both sides get the same tuning.
import moe_serve  # noqa: F401
