"""Generated protobuf and gRPC stubs of protos/moe/v1 (make protos)."""
