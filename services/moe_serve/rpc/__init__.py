"""The gRPC shell both services share: server start and stop, the edge interceptor (auth, limits,
deadlines), serving options, the error taxonomy, the tensor codec glue, shared-memory regions, servicer
registration, and the request context (id, deadline). tests/test_layers.py says what each layer may import."""
