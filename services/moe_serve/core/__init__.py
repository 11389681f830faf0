"""The math of MoE inference in plain torch: no gRPC, protobuf, metrics or environment reads."""
