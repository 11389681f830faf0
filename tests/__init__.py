"""moe-serve's tests; `tests.support` is the helper package they share with benchmarks/ and scripts/."""
