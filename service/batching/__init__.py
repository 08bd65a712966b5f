"""Batching: the in-process batcher (`batcher`, `local`) and the process model's ring, model processes and
the pair that splits batches (`ring`, `instance`, `pair`), started through `launch`."""
