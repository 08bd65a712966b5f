"""Probabilities to the top-k predictions every protocol answers with: one rule, in numpy.

Front-end processes rank the model processes' probabilities themselves and never import torch.
"""

from __future__ import annotations

import numpy as np

from model.labels import imagenet_classes
from service.results import Prediction


def top_k(probs: np.ndarray, k: int) -> list[Prediction]:
    """The `k` most probable classes, most probable first; equal scores in class order (a stable sort)."""
    classes = imagenet_classes()
    indices = np.argsort(-probs, kind="stable")[:k]
    scores = probs[indices]
    return [Prediction(i, classes[i].label, classes[i].wnid, s) for i, s in zip(indices.tolist(), scores.tolist())]
