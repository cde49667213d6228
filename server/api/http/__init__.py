"""The OpenAI-compatible HTTP API, served beside gRPC from the same process and engine."""
