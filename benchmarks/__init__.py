"""moe-serve benchmarks: `python -m benchmarks.run` (what `make bench` runs); see docs/benchmarks.md."""
