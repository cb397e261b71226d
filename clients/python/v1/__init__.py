"""Generated gRPC stubs of protos/plinth/v1 (python protos/generate.py)."""
