"""Clients of loraserve's own gRPC API: the admin client the CLI wraps and the load generator."""
