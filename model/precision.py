"""Which compute dtypes a device runs at a speed worth serving: one rule for the server and the builder.

bfloat16 on CPU pays only where oneDNN can use AMX tiles (Intel Xeon 4th generation and later). Measured on a
2-core Intel Xeon with AMX, LeViT_128S compiled at batch 8 (docs/benchmarks.md): bfloat16 ran 1.4x float32 on
one thread and 1.8x on two; the same artifact with oneDNN held to AVX-512 with bf16 instructions but no AMX
(`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`, what an AMD Zen 4 offers) ran 1.5x *slower* than float32, and
without bf16 instructions (emulated) slower still. So the dtype is the user's choice (it changes the
numbers: logits within about 1% of float32), refused where it would only make the server slower.
"""

from __future__ import annotations

import os

import torch

# oneDNN reads these to cap the instruction set it dispatches to (DNNL_ is the older spelling).
_ONEDNN_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_UNCAPPED = frozenset({"", "ALL", "DEFAULT"})


def amx_usable() -> bool:
    """Does this CPU have AMX tiles, and may oneDNN (which runs the bfloat16 linears and convolutions) use them?"""
    if not torch.cpu._is_amx_tile_supported():
        return False
    for name in _ONEDNN_ISA_ENV:
        cap = os.environ.get(name, "").strip().upper()
        if cap not in _UNCAPPED and "AMX" not in cap:
            return False
    return True


def cpu_dtype_problem(dtype: torch.dtype) -> str | None:
    """Why the CPU should not compute in `dtype` (one line naming the setting), or None where it may."""
    if dtype == torch.float32:
        return None
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.bfloat16:
        if amx_usable():
            return None
        why = "oneDNN is held below AMX by " + _capped_by() if torch.cpu._is_amx_tile_supported() else "it has none"
        return (
            f"LEVIT_DTYPE={name} on CPU needs AMX (Intel Xeon 4th generation or later) and {why}: without AMX, "
            "bfloat16 measured 1.5x slower than float32; use float32, or a GPU"
        )
    return f"LEVIT_DTYPE={name} needs a GPU; on CPU use float32 (or bfloat16 where the CPU has AMX)"


def _capped_by() -> str:
    return ", ".join(f"{n}={os.environ[n]}" for n in _ONEDNN_ISA_ENV if n in os.environ)
