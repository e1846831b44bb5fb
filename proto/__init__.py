"""nextchar.proto: the gRPC API (nextchar.v1) and its generated Python stubs."""
