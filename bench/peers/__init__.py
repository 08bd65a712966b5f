"""levit-serve side by side with TorchServe, LitServe, MLServer and plain FastAPI (python -m bench.peers)."""
