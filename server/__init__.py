"""nextchar.server: the gRPC service — sessions, batching, model registry."""
