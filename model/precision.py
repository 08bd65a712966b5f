"""Which compute dtypes a device runs at a speed worth serving: one rule for the server and the builder.

bfloat16 on CPU pays only where oneDNN can use AMX tiles (Intel Xeon 4th generation and later). Measured on a
2-core Intel Xeon with AMX, LeViT_128S compiled at batch 8 (docs/benchmarks.md): bfloat16 ran 1.66x float32 on
one thread (bench.model: 1.97-2.10x on one thread and 1.79-1.92x on two, at batch 8-16). The same artifact with
oneDNN held to AVX-512 with bf16 instructions but no AMX (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`, what an AMD
Zen 4 offers; no AMD CPU was measured) ran 1.5x *slower* than float32, and without bf16 instructions (emulated)
slower still. So the dtype is the user's choice (it changes the numbers: logits within 0.5-0.7% of float32's
largest), refused where it would only make the server slower.
"""

from __future__ import annotations

import os

import torch

# oneDNN reads the first of these that is set to cap the instruction set it dispatches to (DNNL_ is older).
_ONEDNN_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
_UNCAPPED = frozenset({"ALL", "DEFAULT"})


def _onednn_cap() -> tuple[str, str] | None:
    """The variable and value capping oneDNN's instruction set, as oneDNN reads them, or None."""
    for name in _ONEDNN_ISA_ENV:
        if name in os.environ:
            return name, os.environ[name]
    return None


def amx_usable() -> bool:
    """Can oneDNN (which runs the bfloat16 linears and convolutions) use AMX tiles here?

    The CPU must have them, the kernel must grant this process their state (Linux 5.16 and later, asked for
    by `torch.cpu._init_amx`: a CPU flag alone says nothing about an older kernel or a VM without it), and no
    `ONEDNN_MAX_CPU_ISA` may hold oneDNN below AMX.
    """
    if not (torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx()):
        return False
    cap = _onednn_cap()
    value = cap[1].strip().upper() if cap else "ALL"
    return value in _UNCAPPED or "AMX" in value


def cpu_dtype_problem(dtype: torch.dtype) -> str | None:
    """Why the CPU should not compute in `dtype` (one line naming the setting), or None where it may."""
    if dtype == torch.float32:
        return None
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.bfloat16:
        if amx_usable():
            return None
        cap = _onednn_cap()
        if cap and torch.cpu._is_amx_tile_supported():
            why = f"oneDNN is held below AMX by {cap[0]}={cap[1]}"
        else:
            why = "it cannot use any (no AMX tiles, or the kernel does not grant them)"
        return (
            f"LEVIT_DTYPE={name} on CPU needs AMX (Intel Xeon 4th generation or later) and {why}: without AMX, "
            "bfloat16 measured 1.5x slower than float32; use float32, or a GPU"
        )
    return f"LEVIT_DTYPE={name} needs a GPU; on CPU use float32 (or bfloat16 where the CPU has AMX)"
