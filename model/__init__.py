"""LeViT: official architecture, checkpoints, BN fusion and the serving engine."""

from model.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from model.configs import VARIANTS, LeViTConfig, get_config
from model.cost import Cost, count_macs, model_cost
from model.engine import Engine
from model.fuse import FusedLeViT, fuse
from model.labels import ImageNetClass, imagenet_classes
from model.levit import LeViT, build_levit
from model.loader import WeightsInfo, load_weights
from model.transforms import preprocess
from model.weights import WeightsError, fetch_official

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "Cost",
    "Engine",
    "FusedLeViT",
    "ImageNetClass",
    "LeViT",
    "LeViTConfig",
    "WeightsError",
    "WeightsInfo",
    "build_levit",
    "count_macs",
    "fetch_official",
    "fuse",
    "get_config",
    "imagenet_classes",
    "load_checkpoint",
    "load_weights",
    "model_cost",
    "preprocess",
    "read_state_dict",
]
