"""moe-serve: distributed Mixture-of-Experts inference as gRPC services (expert servers + gateway)."""

__version__ = "0.1.0"
