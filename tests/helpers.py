"""Test-side builders: checkpoints in the published layouts, with BN and attention biases randomised."""

from __future__ import annotations

import torch
from torch import nn

from model.levit import LeViT, build_levit


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Default init makes every BN an identity and every attention bias zero, which hides fusion bugs."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) * 1.5 + 0.5)
            module.weight.copy_(1 + torch.randn(module.weight.shape, generator=gen) * 0.3)
            module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.3)
        if hasattr(module, "attention_biases"):
            module.attention_biases.copy_(torch.randn(module.attention_biases.shape, generator=gen))
    return model


def random_levit(variant: str = "LeViT_128S", seed: int = 0) -> LeViT:
    torch.manual_seed(seed)
    return randomize(build_levit(variant), seed).eval()


def timm_state_dict(model: LeViT) -> dict[str, torch.Tensor]:
    """The same weights under timm's names, walking timm's structure (stages of blocks) independently."""
    official = model.state_dict()
    out: dict[str, torch.Tensor] = {}

    def put(timm_prefix: str, official_prefix: str) -> None:
        for key, value in official.items():
            if key.startswith(official_prefix + ".") and not key.endswith("attention_bias_idxs"):
                rest = key[len(official_prefix) + 1 :]
                out[f"{timm_prefix}.{rest}"] = value.clone()

    def linear_norm(timm_prefix: str, official_prefix: str) -> None:
        put(timm_prefix + ".linear", official_prefix + ".c")
        put(timm_prefix + ".bn", official_prefix + ".bn")

    for i, conv in enumerate((0, 2, 4, 6)):
        linear_norm(f"stem.conv{i + 1}", f"patch_embed.{conv}")
    flat = 0
    for stage, depth in enumerate(model.config.depth):
        if stage:
            down = f"stages.{stage}.downsample"
            linear_norm(f"{down}.attn_downsample.kv", f"blocks.{flat}.kv")
            linear_norm(f"{down}.attn_downsample.q.ln", f"blocks.{flat}.q.1")
            linear_norm(f"{down}.attn_downsample.proj.ln", f"blocks.{flat}.proj.1")
            out[f"{down}.attn_downsample.attention_biases"] = official[f"blocks.{flat}.attention_biases"].clone()
            linear_norm(f"{down}.mlp.ln1", f"blocks.{flat + 1}.m.0")
            linear_norm(f"{down}.mlp.ln2", f"blocks.{flat + 1}.m.2")
            flat += 2
        for block in range(depth):
            base = f"stages.{stage}.blocks.{block}"
            linear_norm(f"{base}.attn.qkv", f"blocks.{flat}.m.qkv")
            linear_norm(f"{base}.attn.proj.ln", f"blocks.{flat}.m.proj.1")
            out[f"{base}.attn.attention_biases"] = official[f"blocks.{flat}.m.attention_biases"].clone()
            linear_norm(f"{base}.mlp.ln1", f"blocks.{flat + 1}.m.0")
            linear_norm(f"{base}.mlp.ln2", f"blocks.{flat + 1}.m.2")
            flat += 2
    for head in ("head", "head_dist"):
        put(f"{head}.bn", f"{head}.bn")
        put(f"{head}.linear", f"{head}.l")
    # timm orders keys its own way; make sure nothing relies on order.
    return dict(sorted(out.items(), reverse=True))


def scrape(base_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """`/metrics` through prometheus-client's own text parser: {(sample name, labels): value}."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
