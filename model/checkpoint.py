"""Read LeViT checkpoints: official `{'model': sd}` .pth, timm (.pth/.safetensors) or a bare state dict.

Only tensors are ever deserialised (`weights_only=True`). timm names are mapped to the official
ones by name (timm orders keys differently and drops `attention_bias_idxs`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import torch

from model.configs import VARIANTS, LeViTConfig, get_config
from model.levit import LeViT, build_levit

StateDict = dict[str, torch.Tensor]

# Buffers a checkpoint may leave out; the model computes them itself.
_DERIVED_SUFFIXES = ("attention_bias_idxs", "num_batches_tracked")


class CheckpointError(ValueError):
    """A checkpoint that cannot become the requested model; the message names the offending keys."""


def read_state_dict(path: str | Path) -> StateDict:
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as error:  # any parse failure of an untrusted file is the file's fault
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint: {reason}") from None
    return unwrap_state_dict(raw, str(path))


def unwrap_state_dict(raw: object, origin: str = "checkpoint") -> StateDict:
    if isinstance(raw, Mapping):
        for key in ("model", "state_dict", "model_ema"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{origin} holds no state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in raw.items()}


def _timm_block_offsets(config: LeViTConfig) -> tuple[list[int], list[int]]:
    """Index in the official flat `blocks` of each timm stage's first block and of its downsample."""
    first, down = [], []
    index = 0
    for stage, depth in enumerate(config.depth):
        if stage:
            down.append(index)
            index += 2
        else:
            down.append(-1)
        first.append(index)
        index += 2 * depth
    return first, down


_TIMM_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r)
    for p, r in [
        (r"^stem\.conv(\d)\.linear\.", "stem.{conv}.c."),
        (r"^stem\.conv(\d)\.bn\.", "stem.{conv}.bn."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.linear\.", "{attn}.m.qkv.c."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.bn\.", "{attn}.m.qkv.bn."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.proj\.ln\.linear\.", "{attn}.m.proj.1.c."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.proj\.ln\.bn\.", "{attn}.m.proj.1.bn."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.attention_bias", "{attn}.m.attention_bias"),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.ln1\.linear\.", "{mlp}.m.0.c."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.ln1\.bn\.", "{mlp}.m.0.bn."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.ln2\.linear\.", "{mlp}.m.2.c."),
        (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.ln2\.bn\.", "{mlp}.m.2.bn."),
        (r"^stages\.(\d+)\.downsample\.attn_downsample\.kv\.linear\.", "{down}.kv.c."),
        (r"^stages\.(\d+)\.downsample\.attn_downsample\.kv\.bn\.", "{down}.kv.bn."),
        (r"^stages\.(\d+)\.downsample\.attn_downsample\.q\.ln\.linear\.", "{down}.q.1.c."),
        (r"^stages\.(\d+)\.downsample\.attn_downsample\.q\.ln\.bn\.", "{down}.q.1.bn."),
        (r"^stages\.(\d+)\.downsample\.attn_downsample\.proj\.ln\.linear\.", "{down}.proj.1.c."),
        (r"^stages\.(\d+)\.downsample\.attn_downsample\.proj\.ln\.bn\.", "{down}.proj.1.bn."),
        (r"^stages\.(\d+)\.downsample\.attn_downsample\.attention_bias", "{down}.attention_bias"),
        (r"^stages\.(\d+)\.downsample\.mlp\.ln1\.linear\.", "{downmlp}.m.0.c."),
        (r"^stages\.(\d+)\.downsample\.mlp\.ln1\.bn\.", "{downmlp}.m.0.bn."),
        (r"^stages\.(\d+)\.downsample\.mlp\.ln2\.linear\.", "{downmlp}.m.2.c."),
        (r"^stages\.(\d+)\.downsample\.mlp\.ln2\.bn\.", "{downmlp}.m.2.bn."),
        (r"^(head|head_dist)\.linear\.", "{head}.l."),
        (r"^(head|head_dist)\.bn\.", "{head}.bn."),
    ]
]


def timm_key_to_official(key: str, config: LeViTConfig) -> str:
    """One timm name to its official name; unknown names are returned unchanged (reported later)."""
    first, down = _timm_block_offsets(config)
    for pattern, template in _TIMM_RULES:
        match = pattern.match(key)
        if not match:
            continue
        groups = match.groups()
        fields: dict[str, str] = {}
        if key.startswith("stem."):
            fields["conv"] = f"patch_embed.{2 * (int(groups[0]) - 1)}"
        elif key.startswith("head"):
            fields["head"] = groups[0]
        elif ".blocks." in key:
            base = first[int(groups[0])] + 2 * int(groups[1])
            fields["attn"], fields["mlp"] = f"blocks.{base}", f"blocks.{base + 1}"
        else:
            base = down[int(groups[0])]
            fields["down"], fields["downmlp"] = f"blocks.{base}", f"blocks.{base + 1}"
        prefix = template.format(**{k: fields.get(k, "") for k in ("conv", "head", "attn", "mlp", "down", "downmlp")})
        return prefix.replace("stem.", "", 1) + key[match.end() :]
    return key


def is_timm_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("stem.", "stages.")) for k in state_dict)


@cache
def expected_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_levit(variant)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _required(shapes: Mapping[str, tuple[int, ...]]) -> set[str]:
    return {k for k in shapes if not k.endswith(_DERIVED_SUFFIXES)}


def _mismatches(state_dict: Mapping[str, torch.Tensor], variant: str) -> tuple[list[str], list[str], list[str]]:
    shapes = expected_shapes(variant)
    missing = sorted(_required(shapes) - state_dict.keys())
    unexpected = sorted(state_dict.keys() - shapes.keys())
    wrong = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {shapes[k]}"
        for k, v in state_dict.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    )
    return missing, unexpected, wrong


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The variant whose keys and shapes the (official-layout) state dict matches exactly."""
    for name in VARIANTS:
        if not any(_mismatches(state_dict, name)):
            return name
    return None


def to_official_layout(state_dict: StateDict, variant: str) -> StateDict:
    if not is_timm_layout(state_dict):
        return state_dict
    config = get_config(variant)
    return {timm_key_to_official(k, config): v for k, v in state_dict.items()}


def _describe(problems: tuple[list[str], list[str], list[str]], limit: int = 8) -> str:
    parts = []
    for title, items in zip(("missing keys", "unexpected keys", "shape mismatches"), problems):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def _resolve_variant(state_dict: StateDict, requested: str | None, origin: str) -> tuple[str, StateDict]:
    candidates = [requested] if requested else list(VARIANTS)
    for name in candidates:
        mapped = to_official_layout(state_dict, name)
        if not any(_mismatches(mapped, name)):
            return name, mapped
    # Name what it really is, when it is some other variant, before listing key problems.
    for name in VARIANTS:
        if name != requested and not any(_mismatches(to_official_layout(state_dict, name), name)):
            raise CheckpointError(f"{origin} is a {name} checkpoint, but {requested} was requested")
    target = requested or "any LeViT variant"
    problems = _mismatches(to_official_layout(state_dict, requested or "LeViT_128S"), requested or "LeViT_128S")
    raise CheckpointError(f"{origin} does not fit {target}: {_describe(problems)}")


def load_levit(state_dict: StateDict, variant: str | None = None, origin: str = "checkpoint") -> LeViT:
    """A training-form model with the checkpoint's weights; the variant is detected when not given."""
    name, mapped = _resolve_variant(state_dict, variant, origin)
    model = build_levit(name)
    own = model.state_dict()
    # Index tables are derived from the architecture; never take them from a file.
    full = {k: own[k] if k.endswith("attention_bias_idxs") else mapped.get(k, own[k]) for k in own}
    model.load_state_dict(full, strict=True)
    return model.eval()


def load_checkpoint(path: str | Path, variant: str | None = None) -> LeViT:
    return load_levit(read_state_dict(path), variant, origin=str(path))
