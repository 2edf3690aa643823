"""Block-wise FP8 (e4m3) weight quantisation, the format of the released K2 / DeepSeek-V3 checkpoints.

A weight W (n, m) is stored as e4m3 values plus `weight_scale_inv` (ceil(n/128), ceil(m/128)) float32,
one scale per 128x128 block:  W ~= W_fp8 * scale_inv[block]. The scale maps each block's absolute
maximum onto e4m3's largest finite value (448), so no element overflows.

Error bound (what the tests check): e4m3 has 3 mantissa bits, so round-to-nearest of a normal value
has relative error <= 2^-4; values in the subnormal range (below 2^-6 in scaled units) have absolute
error <= 2^-10 in scaled units. Per element: |W - deq(q(W))| <= max(2^-4 |W|, 2^-10 * scale_inv).
"""

from __future__ import annotations

import torch

BLOCK = 128
E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def _blocks(shape: tuple[int, int], block: int) -> tuple[int, int]:
    return (-(-shape[0] // block), -(-shape[1] // block))


def quantize_block_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """W (n, m) -> (W_fp8 (n, m) e4m3, scale_inv (ceil(n/b), ceil(m/b)) float32)."""
    if w.ndim != 2:
        raise ValueError(f"block FP8 quantisation needs a 2-D weight, got shape {tuple(w.shape)}")
    n, m = w.shape
    nb, mb = _blocks((n, m), block)
    padded = torch.zeros(nb * block, mb * block, dtype=torch.float32, device=w.device)
    padded[:n, :m] = w.float()
    tiles = padded.view(nb, block, mb, block)
    amax = tiles.abs().amax(dim=(1, 3))  # (nb, mb)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return q.view(nb * block, mb * block)[:n, :m].contiguous(), scale


def dequantize_block_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = BLOCK
) -> torch.Tensor:
    """Inverse of `quantize_block_fp8`: W = W_fp8 * scale_inv expanded over its 128x128 block."""
    n, m = q.shape
    expected = _blocks((n, m), block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a {n}x{m} weight"
        )
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :m]
    return (q.float() * s).to(dtype)


def fp8_error_bound(w: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Per-element worst-case |W - deq(q(W))| implied by e4m3 rounding (see module docstring)."""
    n, m = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :m]
    return torch.maximum(w.float().abs() * 2.0**-4, s * 2.0**-10)
