"""The LeViT family: official layout, fusion exactness, batch independence, cost, labels."""

from __future__ import annotations

import pytest
import torch

from model.configs import VARIANTS
from model.cost import count_macs, count_params
from model.engine import Engine, bucket_sizes
from model.fuse import fuse
from model.labels import imagenet_classes
from model.levit import build_levit
from tests.helpers import random_levit

# Spot checks of the official checkpoint layout (facebookresearch/LeViT, LeViT-128S).
OFFICIAL_128S_SHAPES = {
    "patch_embed.0.c.weight": (16, 3, 3, 3),
    "patch_embed.0.bn.running_var": (16,),
    "patch_embed.6.c.weight": (128, 64, 3, 3),
    "blocks.0.m.qkv.c.weight": (256, 128),
    "blocks.0.m.attention_biases": (4, 196),
    "blocks.0.m.attention_bias_idxs": (196, 196),
    "blocks.0.m.proj.1.c.weight": (128, 128),
    "blocks.1.m.0.c.weight": (256, 128),
    "blocks.1.m.2.c.weight": (128, 256),
    "blocks.4.kv.c.weight": (640, 128),
    "blocks.4.q.1.c.weight": (128, 128),
    "blocks.4.attention_biases": (8, 196),
    "blocks.4.attention_bias_idxs": (49, 196),
    "blocks.4.proj.1.c.weight": (256, 512),
    "blocks.5.m.0.c.weight": (512, 256),
    "blocks.12.kv.c.weight": (1280, 256),
    "blocks.12.attention_bias_idxs": (16, 49),
    "blocks.21.m.2.c.weight": (384, 768),
    "head.bn.weight": (384,),
    "head.l.weight": (1000, 384),
    "head_dist.l.bias": (1000,),
}
PAPER_PARAMS_M = {"LeViT_128S": 7.8, "LeViT_128": 9.2, "LeViT_192": 11.0, "LeViT_256": 19.0, "LeViT_384": 39.1}


def test_state_dict_matches_official_layout() -> None:
    sd = build_levit("LeViT_128S").state_dict()
    for key, shape in OFFICIAL_128S_SHAPES.items():
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 336
    assert not [k for k in sd if k.startswith("blocks.22")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_match_paper(variant: str) -> None:
    params = count_params(build_levit(variant)) / 1e6
    assert params == pytest.approx(PAPER_PARAMS_M[variant], rel=0.03)


@pytest.mark.parametrize("variant", VARIANTS)
def test_macs_reproduce_paper_flops(variant: str) -> None:
    config = VARIANTS[variant]
    assert count_macs(config) / 1e6 == pytest.approx(config.paper_mflops, rel=0.01)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_model_equals_training_form(variant: str) -> None:
    model = random_levit(variant, seed=1)
    fused = fuse(model)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected, actual = model(x), fused(x)
    assert torch.isfinite(expected).all()
    rel = (expected - actual).abs().max() / expected.abs().max()
    assert rel <= 1e-4
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    assert isinstance(fused.head, torch.nn.Linear)


def test_randomised_statistics_actually_matter() -> None:
    """Guard for the test above: the randomisation changes the output, so fusion is really exercised."""
    x = torch.randn(2, 3, 224, 224)
    torch.manual_seed(0)
    plain = build_levit("LeViT_128S").eval()
    randomised = random_levit("LeViT_128S", seed=0)
    with torch.inference_mode():
        assert (plain(x) - randomised(x)).abs().max() > 1e-2


def test_logits_do_not_depend_on_batch_neighbours() -> None:
    fused = fuse(random_levit("LeViT_128S", seed=3))
    batch = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        together = fused(batch)
        alone = torch.cat([fused(batch[i : i + 1]) for i in range(16)])
    assert (together - alone).abs().max() <= 1e-4


def test_labels_in_official_order() -> None:
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert (classes[0].wnid, classes[0].label) == ("n01440764", "tench")
    assert (classes[281].wnid, classes[281].label) == ("n02123045", "tabby")
    assert classes[999].label == "toilet tissue"


def test_bucket_sizes() -> None:
    assert bucket_sizes(16) == (1, 2, 4, 8, 16)
    assert bucket_sizes(12) == (1, 2, 4, 8, 12)
    assert bucket_sizes(1) == (1,)


@pytest.mark.parametrize("kind", ["eager", "trace", "compile"])
def test_engines_agree_with_fused_eager(kind: str) -> None:
    fused = fuse(random_levit("LeViT_128S", seed=5))
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        expected = fused(x)
    engine = Engine(fused, kind=kind, max_batch_size=4)
    assert engine.kind == kind
    out = engine(x)
    assert out.shape == (3, 1000)
    assert (out - expected).abs().max() / expected.abs().max() <= 1e-4
    # a padded batch (3 -> 4 for compile) returns the same rows as single images
    assert (engine(x[:1]) - out[:1]).abs().max() <= 1e-4
