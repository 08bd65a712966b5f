"""Parameters and multiply-accumulates per image, counted the way the LeViT paper counts FLOPs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import nn

from model.configs import IMAGE_SIZE, NUM_CLASSES, PATCH_SIZE, LeViTConfig


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _attention_macs(tokens_q: int, tokens_k: int, heads: int, key_dim: int, value_dim: int) -> int:
    """q@k^T, the softmax (one op per logit, as the paper counts it) and attn@v."""
    return heads * tokens_q * tokens_k * (key_dim + 1 + value_dim)


def count_macs(config: LeViTConfig, num_classes: int = NUM_CLASSES) -> int:
    """Analytic MACs for one 224x224 image: stem convs, linears, attention products and the head."""
    macs = 0
    chans = [3, *(config.embed_dim[0] // f for f in (8, 4, 2, 1))]
    side = IMAGE_SIZE
    for cin, cout in itertools.pairwise(chans):
        side //= 2
        macs += cin * cout * 9 * side * side
    res = IMAGE_SIZE // PATCH_SIZE
    kd = config.key_dim
    for stage, (dim, heads, depth) in enumerate(zip(config.embed_dim, config.num_heads, config.depth)):
        n = res * res
        d = config.attn_ratio * kd
        for _ in range(depth):
            macs += n * dim * (heads * (2 * kd + d))  # qkv
            macs += _attention_macs(n, n, heads, kd, d)
            macs += n * heads * d * dim  # proj
            macs += 2 * n * dim * dim * config.mlp_ratio  # mlp
        if stage < 2:
            out_dim = config.embed_dim[stage + 1]
            h = config.down_heads(stage)
            d = config.down_attn_ratio * kd
            res_q = (res - 1) // config.stride + 1
            nq = res_q * res_q
            macs += n * dim * h * (kd + d)  # kv
            macs += nq * dim * h * kd  # q on the subsampled grid
            macs += _attention_macs(nq, n, h, kd, d)
            macs += nq * h * d * out_dim  # proj
            macs += 2 * nq * out_dim * out_dim * config.down_mlp_ratio
            res = res_q
    return macs + config.embed_dim[-1] * num_classes


def model_cost(config: LeViTConfig, model: nn.Module) -> Cost:
    return Cost(params=count_params(model), macs=count_macs(config))
