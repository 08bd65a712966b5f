"""Top-k (`service/ranking.py`): the one rule every protocol ranks probabilities by, in numpy."""

from __future__ import annotations

import numpy as np
import torch

from model.labels import imagenet_classes
from service.ranking import top_k


def test_agrees_with_torch_topk_on_distinct_scores() -> None:
    probs = torch.randn(1000, generator=torch.Generator().manual_seed(3)).softmax(-1)
    want = probs.topk(5)
    got = top_k(probs.numpy(), 5)
    assert [p.index for p in got] == want.indices.tolist()
    assert [p.score for p in got] == want.values.tolist()  # float32 values, exactly
    classes = imagenet_classes()
    assert [(p.label, p.wnid) for p in got] == [(classes[i].label, classes[i].wnid) for i in want.indices.tolist()]


def test_equal_scores_rank_in_class_order_and_k_can_be_every_class() -> None:
    probs = np.full(1000, 0.0005, dtype=np.float32)
    probs[[7, 3, 900]] = 0.1
    assert [p.index for p in top_k(probs, 5)] == [3, 7, 900, 0, 1]
    everything = top_k(probs, 1000)
    assert sorted(p.index for p in everything) == list(range(1000))
    scores = [p.score for p in everything]
    assert scores == sorted(scores, reverse=True)
