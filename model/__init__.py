"""LeViT: official architecture, checkpoints, BN fusion and the serving engine.

The names below load on first use: importing a light submodule (`model.configs`, `model.weights`, as the
settings do) must not import torch, which the server's supervisor and `levit-weights` never need.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "model.checkpoint": ("CheckpointError", "load_checkpoint", "read_state_dict"),
    "model.configs": ("VARIANTS", "LeViTConfig", "get_config"),
    "model.cost": ("Cost", "count_macs", "model_cost"),
    "model.engine": ("Engine",),
    "model.fuse": ("FusedLeViT",),  # not `fuse`: the submodule's own name (`from model.fuse import fuse`)
    "model.labels": ("ImageNetClass", "imagenet_classes"),
    "model.levit": ("LeViT", "build_levit"),
    "model.loader": ("WeightsInfo", "load_weights"),
    "model.precision": ("cpu_dtype_problem",),
    "model.transforms": ("preprocess",),
    "model.weights": ("WeightsError", "fetch_official"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    if name not in _HOME_OF:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME_OF[name]), name)
