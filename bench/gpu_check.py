"""Checks for a machine with CUDA and timm (run there: `python -m bench.gpu_check OUT.json`).

1. timm cross-check: a timm LeViT with randomised BatchNorm statistics and attention biases, loaded
   through our timm-name mapping, must give timm's own outputs (independent check of architecture + mapping).
2. CUDA engine: fp32/fp16/bf16 probabilities against the CPU fp32 reference, and images/s per batch size.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

from model.checkpoint import load_levit
from model.configs import VARIANTS
from model.engine import Engine
from model.fuse import fuse
from model.levit import build_levit
from tests.helpers import randomize


def timm_crosscheck(x: torch.Tensor) -> dict[str, float]:
    import timm

    out = {}
    for name, config in VARIANTS.items():
        reference = randomize(timm.create_model(config.timm_name, pretrained=False), seed=3).eval()
        ours = load_levit({k: v.clone() for k, v in reference.state_dict().items()})
        with torch.inference_mode():
            a, b = reference(x), ours(x)
        assert ours.config.name == name
        out[name] = ((a - b).abs().max() / a.abs().max()).item()
    return out


def cuda_engines(x: torch.Tensor) -> dict[str, dict[str, float]]:
    device = torch.device("cuda")
    out = {}
    for name in ("LeViT_128S", "LeViT_384"):
        torch.manual_seed(7)
        fused = fuse(randomize(build_levit(name), seed=5))
        with torch.inference_mode():
            reference = fused(x).softmax(-1)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            engine = Engine(copy.deepcopy(fused), "eager", 256, device, dtype)
            probs = engine(x).softmax(-1).cpu()
            row = {
                "max_abs_prob_diff": (probs - reference).abs().max().item(),
                "top1_agree": (probs.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            }
            for batch_size in (1, 16, 64, 256):
                batch = torch.randn(batch_size, 3, 224, 224, device=device, dtype=dtype)
                for _ in range(5):
                    engine(batch)
                torch.cuda.synchronize()
                runs = max(10, 2048 // batch_size)
                start = time.perf_counter()
                for _ in range(runs):
                    engine(batch)
                torch.cuda.synchronize()
                row[f"img/s@{batch_size}"] = round(batch_size * runs / (time.perf_counter() - start))
            out[f"{name}/{str(dtype).removeprefix('torch.')}"] = row
            print(name, dtype, row, flush=True)
    return out


def main() -> None:
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    report = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    report["timm_rel_err"] = timm_crosscheck(x)
    print(report, flush=True)
    report["cuda"] = cuda_engines(x)
    with open(sys.argv[1], "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
