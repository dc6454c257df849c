"""The jobgate worker: a gRPC server that runs scripts for the scheduler."""
