"""The gateway (`moe-gateway`): dense layers, router and KV cache; scatters each MoE layer's tokens to the
expert servers and gathers their sums; batches concurrent requests and overlaps micro-batches."""
