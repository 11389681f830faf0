"""moe-serve: distributed Mixture-of-Experts inference as gRPC services (expert servers + gateway)."""

from moe_serve.process.openmp import keep_spin_short

keep_spin_short()  # before any module of ours imports torch (process/openmp.py)

__version__ = "0.1.0"
