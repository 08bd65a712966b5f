"""Training form -> serving form: BatchNorm folded away, heads merged, attention biases pre-gathered.

Every op the serving model runs is a conv, a linear, Hardswish, softmax or a matmul; nothing
depends on batch statistics, so an image's logits do not depend on its batch neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model import levit as train


def _bn_scale_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fuse_conv_bn(block: train.Conv2dBN) -> nn.Conv2d:
    conv = block.c
    scale, shift = _bn_scale_shift(block.bn)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    fused.weight.copy_(conv.weight * scale[:, None, None, None])
    fused.bias.copy_(shift)
    return fused


@torch.no_grad()
def fuse_linear_bn(block: train.LinearBN) -> nn.Linear:
    scale, shift = _bn_scale_shift(block.bn)
    fused = nn.Linear(block.c.in_features, block.c.out_features)
    fused.weight.copy_(block.c.weight * scale[:, None])
    fused.bias.copy_(shift)
    return fused


@torch.no_grad()
def fuse_bn_linear(block: train.BNLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """y = W (x*s + t) + b = (W*s) x + (W t + b)."""
    scale, shift = _bn_scale_shift(block.bn)
    return block.l.weight * scale[None, :], block.l.weight @ shift + block.l.bias


@torch.no_grad()
def merge_heads(head: train.BNLinear, head_dist: train.BNLinear) -> nn.Linear:
    """The eval output is the mean of both heads, and a mean of linears is one linear."""
    (w1, b1), (w2, b2) = fuse_bn_linear(head), fuse_bn_linear(head_dist)
    merged = nn.Linear(w1.shape[1], w1.shape[0])
    merged.weight.copy_((w1 + w2) / 2)
    merged.bias.copy_((b1 + b2) / 2)
    return merged


@torch.no_grad()
def _fold_query_scale(linear: nn.Linear, num_heads: int, per_head: int, key_dim: int, scale: float) -> None:
    """Scale the query rows in place so attention needs no separate multiply by 1/sqrt(D)."""
    rows = linear.weight.view(num_heads, per_head, -1)
    rows[:, :key_dim] *= scale
    linear.bias.view(num_heads, per_head)[:, :key_dim] *= scale


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + bias) v in one fused kernel; the 1/sqrt(D) scale is already in q."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


class FusedAttention(nn.Module):
    def __init__(self, src: train.Attention) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.d, self.dh = src.num_heads, src.key_dim, src.d, src.dh
        self.qkv = fuse_linear_bn(src.qkv)
        _fold_query_scale(self.qkv, self.num_heads, 2 * self.key_dim + self.d, self.key_dim, src.scale)
        self.act = nn.Hardswish()
        self.proj = fuse_linear_bn(src.proj[1])
        self.register_buffer("ab", src.gathered_biases().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], dim=3)
        x = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.ab)
        return self.proj(self.act(x.transpose(1, 2).reshape(b, n, self.dh)))


class FusedAttentionSubsample(nn.Module):
    def __init__(self, src: train.AttentionSubsample) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.d, self.dh = src.num_heads, src.key_dim, src.d, src.dh
        self.queries = src.resolution_**2
        self.kv = fuse_linear_bn(src.kv)
        self.subsample = src.q[0]
        self.q = fuse_linear_bn(src.q[1])
        _fold_query_scale(self.q, self.num_heads, self.key_dim, self.key_dim, src.scale)
        self.act = nn.Hardswish()
        self.proj = fuse_linear_bn(src.proj[1])
        self.register_buffer("ab", src.gathered_biases().detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.d], dim=3)
        q = self.q(self.subsample(x)).view(b, self.queries, self.num_heads, self.key_dim)
        x = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.ab)
        return self.proj(self.act(x.transpose(1, 2).reshape(b, self.queries, self.dh)))


class FusedMLP(nn.Module):
    def __init__(self, src: nn.Sequential) -> None:
        super().__init__()
        self.fc1 = fuse_linear_bn(src[0])
        self.act = nn.Hardswish()
        self.fc2 = fuse_linear_bn(src[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _fuse_block(block: nn.Module) -> nn.Module:
    if isinstance(block, train.AttentionSubsample):
        return FusedAttentionSubsample(block)
    if isinstance(block, train.Residual) and isinstance(block.m, train.Attention):
        return train.Residual(FusedAttention(block.m))
    if isinstance(block, train.Residual) and isinstance(block.m, nn.Sequential):
        return train.Residual(FusedMLP(block.m))
    raise TypeError(f"cannot fuse {type(block).__name__}")


class FusedLeViT(nn.Module):
    """Serving form: no BatchNorm, one classifier, eval only."""

    def __init__(self, src: train.LeViT) -> None:
        super().__init__()
        self.config = src.config
        self.patch_embed = nn.Sequential(
            *(fuse_conv_bn(m) if isinstance(m, train.Conv2dBN) else nn.Hardswish() for m in src.patch_embed)
        )
        self.blocks = nn.Sequential(*(_fuse_block(b) for b in src.blocks))
        self.head = merge_heads(src.head, src.head_dist)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


def fuse(model: train.LeViT) -> FusedLeViT:
    """Build the serving model; the source is left untouched."""
    fused = FusedLeViT(model.eval()).eval()
    fused.requires_grad_(False)
    return fused
