from service.batching.batcher import Batcher

__all__ = ["Batcher"]
