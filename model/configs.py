"""The LeViT family as data: official hyper-parameters, published weights and paper FLOPs."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SIZE = 224
PATCH_SIZE = 16
NUM_CLASSES = 1000
WEIGHTS_BASE_URL = "https://dl.fbaipublicfiles.com/LeViT/"


@dataclass(frozen=True)
class LeViTConfig:
    """One variant. Per-stage tuples have three entries; the two stage transitions subsample."""

    name: str
    embed_dim: tuple[int, int, int]
    key_dim: int
    num_heads: tuple[int, int, int]
    depth: tuple[int, int, int]
    weights_file: str
    paper_mflops: int
    attn_ratio: int = 2
    mlp_ratio: int = 2
    down_attn_ratio: int = 4
    down_mlp_ratio: int = 2
    stride: int = 2

    @property
    def weights_url(self) -> str:
        return WEIGHTS_BASE_URL + self.weights_file

    @property
    def sha256_prefix(self) -> str:
        """The published file name ends in the first 8 hex digits of the file's SHA-256."""
        return self.weights_file.rsplit("-", 1)[1].split(".")[0]

    @property
    def timm_name(self) -> str:
        return "levit_" + self.name.split("_", 1)[1].lower()

    def down_heads(self, stage: int) -> int:
        """Heads of the attention-subsample block that leaves `stage`."""
        return self.embed_dim[stage] // self.key_dim


def _cfg(name: str, embed: str, key_dim: int, heads: str, depth: str, file: str, mflops: int) -> LeViTConfig:
    def triple(s: str) -> tuple[int, int, int]:
        a, b, c = (int(x) for x in s.split("_"))
        return a, b, c

    return LeViTConfig(name, triple(embed), key_dim, triple(heads), triple(depth), file, mflops)


VARIANTS: dict[str, LeViTConfig] = {
    c.name: c
    for c in (
        _cfg("LeViT_128S", "128_256_384", 16, "4_6_8", "2_3_4", "LeViT-128S-96703c44.pth", 305),
        _cfg("LeViT_128", "128_256_384", 16, "4_8_12", "4_4_4", "LeViT-128-b88c2750.pth", 406),
        _cfg("LeViT_192", "192_288_384", 32, "3_5_6", "4_4_4", "LeViT-192-92712e41.pth", 658),
        _cfg("LeViT_256", "256_384_512", 32, "4_6_8", "4_4_4", "LeViT-256-13b5763e.pth", 1120),
        _cfg("LeViT_384", "384_512_768", 32, "6_9_12", "4_4_4", "LeViT-384-9bdaf2e2.pth", 2353),
    )
}


def get_config(name: str) -> LeViTConfig:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown LeViT variant {name!r}; choose one of {', '.join(VARIANTS)}") from None
