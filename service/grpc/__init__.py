"""The gRPC API (`levit.v1.Classifier`, health, reflection) over the shared Service; stubs in `gen/`."""
