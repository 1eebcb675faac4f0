"""How a large store holds its keys and values: as-is in a float dtype, or as int8 codes with one scale per
token and key/value head.

int8 with a per-token-per-head scale keeps each 64-dim head vector in 64 + 2 bytes instead of 128 (bf16) or
256 (fp32): on SmolLM2-135M (30 layers, 3 KV heads) a stored token costs 11,880 bytes of keys/values instead
of 23,040 in bf16. A scale per token (not per block) costs 3 % more than a per-block scale but lets a ring
store add any number of tokens at any slot, and one outlier token cannot coarsen its block's neighbours.
Codes are dequantised only where they are read: the blocks a search scores, the entries a read gathers.
"""

from __future__ import annotations

from typing import Literal

import torch

StoreDtype = Literal["model", "bf16", "fp16", "int8"]  # the `store_dtype` option of the large stores
STORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
CODE_MAX = 127  # symmetric: codes in [-127, 127], so 0 is exact and +x/-x round alike
SCALE_DTYPE = torch.float16  # 2 bytes a scale; its 11-bit mantissa keeps the scale to 0.05 %
QUANTISED = torch.int8


def quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes `[..., d]` and fp16 scales `[...]` of `x [..., d]`: each vector's largest magnitude maps to
    127. The scale is rounded to fp16 *before* the codes are computed, so decoding uses the very scale the
    codes were made with (error at most half a step, scale / 2, per element)."""
    xf = x.float()
    tiny = torch.finfo(SCALE_DTYPE).tiny  # an all-zero vector still gets a usable (normal) scale
    scale = (xf.abs().amax(-1) / CODE_MAX).clamp(min=tiny).to(SCALE_DTYPE)
    codes = (xf / scale.float().unsqueeze(-1)).round().clamp(-CODE_MAX, CODE_MAX).to(QUANTISED)
    return codes, scale


def dequantise(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`codes [..., d]` times their `scale [...]`, computed in fp32, returned in `dtype`."""
    return (codes.float() * scale.float().unsqueeze(-1)).to(dtype)


def store_dtype(name: StoreDtype, model: torch.dtype) -> torch.dtype:
    """The dtype a store option names ("model": the model's own)."""
    return STORE_DTYPES.get(name, model)
