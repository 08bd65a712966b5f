"""LeViT in training form, module for module as facebookresearch/LeViT builds it.

Module names and parameter shapes match the official checkpoints exactly, so those load with
`strict=True`; `model.fuse` turns this into the serving form.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from model.configs import IMAGE_SIZE, NUM_CLASSES, PATCH_SIZE, LeViTConfig, get_config


class Conv2dBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm (official `Conv2d_BN`: children `c`, `bn`)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, pad: int = 0) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, pad, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class LinearBN(nn.Sequential):
    """Bias-free linear on tokens `(B, N, C)` followed by BatchNorm1d over all tokens."""

    def __init__(self, cin: int, cout: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.add_module("c", nn.Linear(cin, cout, bias=False))
        self.add_module("bn", nn.BatchNorm1d(cout))
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class BNLinear(nn.Sequential):
    """Classifier head: BatchNorm1d then linear (children `bn`, `l`)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(cin))
        self.add_module("l", nn.Linear(cin, cout))
        nn.init.trunc_normal_(self.l.weight, std=0.02)
        nn.init.zeros_(self.l.bias)


class Residual(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.m(x)


class Subsample(nn.Module):
    """Keep every `stride`-th token of a `resolution`x`resolution` grid in both directions."""

    def __init__(self, stride: int, resolution: int) -> None:
        super().__init__()
        self.stride = stride
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        grid = x.view(b, self.resolution, self.resolution, c)
        return grid[:, :: self.stride, :: self.stride].reshape(b, -1, c)


def bias_index_table(resolution: int, query_resolution: int | None = None, stride: int = 1) -> tuple[int, torch.Tensor]:
    """Official attention-offset numbering: distinct |dy|,|dx| offsets in order of first appearance.

    Returns the number of distinct offsets and the `(queries, keys)` index table into them.
    """
    query_resolution = query_resolution or resolution
    keys = list(itertools.product(range(resolution), range(resolution)))
    queries = list(itertools.product(range(query_resolution), range(query_resolution)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for qy, qx in queries:
        for ky, kx in keys:
            offset = (abs(qy * stride - ky), abs(qx * stride - kx))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    return len(offsets), torch.tensor(idxs, dtype=torch.long).view(len(queries), len(keys))


class _BiasedAttention(nn.Module):
    """Shared head bookkeeping and the learned per-offset attention biases."""

    def _init_biases(self, num_heads: int, resolution: int, query_resolution: int, stride: int) -> None:
        num_offsets, idxs = bias_index_table(resolution, query_resolution, stride)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", idxs)

    def gathered_biases(self) -> torch.Tensor:
        """`(heads, queries, keys)` bias added to the attention logits."""
        return self.attention_biases[:, self.attention_bias_idxs]


class Attention(_BiasedAttention):
    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, resolution: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.d = attn_ratio * key_dim
        self.dh = self.d * num_heads
        self.qkv = LinearBN(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(self.dh, dim, bn_weight_init=0))
        self._init_biases(num_heads, resolution, resolution, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.gathered_biases()
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.dh)
        return self.proj(x)


class AttentionSubsample(_BiasedAttention):
    """Attention whose queries come from a stride-2 subsampled grid: the stage transition."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: int,
        stride: int,
        resolution: int,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.d = attn_ratio * key_dim
        self.dh = self.d * num_heads
        self.resolution_ = (resolution - 1) // stride + 1
        self.kv = LinearBN(in_dim, self.dh + key_dim * num_heads)
        self.q = nn.Sequential(Subsample(stride, resolution), LinearBN(in_dim, key_dim * num_heads))
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(self.dh, out_dim))
        self._init_biases(num_heads, resolution, self.resolution_, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.d], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = self.q(x).view(b, self.resolution_**2, self.num_heads, self.key_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.gathered_biases()
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, -1, self.dh)
        return self.proj(x)


def mlp(dim: int, ratio: int) -> Residual:
    hidden = dim * ratio
    return Residual(nn.Sequential(LinearBN(dim, hidden), nn.Hardswish(), LinearBN(hidden, dim, bn_weight_init=0)))


def stem(dim: int) -> nn.Sequential:
    """Four 3x3 stride-2 convs: 224x224x3 -> 14x14xdim."""
    chans = [3, dim // 8, dim // 4, dim // 2, dim]
    layers: list[nn.Module] = []
    for i in range(4):
        if i:
            layers.append(nn.Hardswish())
        layers.append(Conv2dBN(chans[i], chans[i + 1], 3, 2, 1))
    return nn.Sequential(*layers)


class LeViT(nn.Module):
    """Training form: separate classifier and distillation heads whose eval outputs are averaged."""

    def __init__(self, config: LeViTConfig, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = stem(config.embed_dim[0])
        blocks: list[nn.Module] = []
        resolution = IMAGE_SIZE // PATCH_SIZE
        for stage, (dim, heads, depth) in enumerate(zip(config.embed_dim, config.num_heads, config.depth)):
            for _ in range(depth):
                blocks.append(Residual(Attention(dim, config.key_dim, heads, config.attn_ratio, resolution)))
                blocks.append(mlp(dim, config.mlp_ratio))
            if stage < 2:
                out_dim = config.embed_dim[stage + 1]
                blocks.append(
                    AttentionSubsample(
                        dim,
                        out_dim,
                        config.key_dim,
                        config.down_heads(stage),
                        config.down_attn_ratio,
                        config.stride,
                        resolution,
                    )
                )
                resolution = (resolution - 1) // config.stride + 1
                blocks.append(mlp(out_dim, config.down_mlp_ratio))
        self.blocks = nn.Sequential(*blocks)
        self.head = BNLinear(config.embed_dim[-1], num_classes)
        self.head_dist = BNLinear(config.embed_dim[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.blocks(x).mean(1)
        logits, logits_dist = self.head(x), self.head_dist(x)
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


def build_levit(name: str) -> LeViT:
    """A freshly initialised training-form model of the named variant."""
    return LeViT(get_config(name))
