"""The jobgate scheduler: HTTP gateway and gRPC membership service."""
