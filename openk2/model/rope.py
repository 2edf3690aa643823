"""Rotary position embedding with YaRN frequency scaling, as K2 and DeepSeek-V3 use it.

Only the `qk_rope_head_dim` decoupled dims of each query head and the one shared rope key are rotated.
The checkpoint stores those dims as interleaved pairs (x0, x1), (x2, x3), ...; each pair is rotated by
one frequency and stays where it is. (The reference implementation writes the rotated pairs back
de-interleaved; that is one fixed permutation of both queries and keys, so every q.k product, and hence
the model, is the same either way.) The latent cache holds the rotated key in this layout.
"""

from __future__ import annotations

import math

import torch

from openk2.config import ModelConfig, yarn_mscale


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dim whose wavelength completes `num_rotations` turns over `max_pos` positions."""
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def inv_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies (dim/2,) and the cos/sin amplitude factor.

    YaRN keeps the high-frequency dims as they are (extrapolate), divides the low-frequency dims by
    `factor` (interpolate) and blends linearly in between, the blend range set by beta_fast/beta_slow.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = config.rope_scaling
    if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
        return inv_freq, 1.0
    factor = rs["factor"]
    original = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    low = math.floor(_yarn_correction_dim(beta_fast, dim, base, original))
    high = math.ceil(_yarn_correction_dim(beta_slow, dim, base, original))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep), 0: interpolate (divide by factor)
    inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        amplitude = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        amplitude = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        amplitude = yarn_mscale(factor)
    return inv_freq, amplitude


class RotaryEmbedding(torch.nn.Module):
    """Turns positions into (cos, sin) tables; holds no state that a checkpoint needs."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.amplitude = inv_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., seq) int -> cos, sin of shape (..., seq, dim/2), float32."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        return angles.cos() * self.amplitude, angles.sin() * self.amplitude

    def reset_parameters(self, config: ModelConfig) -> None:
        """Recompute the table after the module was built on the meta device and moved with to_empty()."""
        inv_freq, self.amplitude = inv_frequencies(config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (a, b) of x (..., seq, heads, dim) into (a cos - b sin, a sin + b cos),
    angles given as cos/sin (..., seq, dim/2); computed in float32, returned in x's dtype.

    Eagerly this is one complex multiply (few kernels, which matters in a decode step); under
    torch.compile it is written in real arithmetic, since inductor does not generate code for complex.
    """
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    if not torch.compiler.is_compiling():
        pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).to(x.dtype)
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)
