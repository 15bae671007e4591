"""How Bagel places latent patches in the language model's space: the noise level's sinusoidal embedding
through an MLP (``time_embedder``) and a fixed 2-D sine-cosine table indexed by patch position
(``latent_pos_embed``), both added to the projected patch (``vae2llm``)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimestepEmbedder(nn.Module):
    """``mlp(sinusoid(t))`` of DiT, with t the noise level in [0, 1] itself (not scaled to 1000)."""

    def __init__(self, hidden: int, frequencies: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.frequencies = frequencies

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, hidden)."""
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def sincos_table(side: int, dim: int) -> torch.Tensor:
    """(side * side, dim) float32 sine-cosine embedding of a side x side grid, row-major: entry ``r * side + c``
    holds the column's 1-D embedding in its first half and the row's in its second (MAE/DiT's layout), each
    ``[sin(p w), cos(p w)]`` with ``w_k = 10000^(-k / (dim / 4))``. Computed in float64, as the reference."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(side, dtype=torch.float64)
    one_d = torch.outer(coords, omega)
    one_d = torch.cat([one_d.sin(), one_d.cos()], dim=1)  # (side, dim / 2)
    rows = one_d[:, None, :].expand(side, side, -1)
    cols = one_d[None, :, :].expand(side, side, -1)
    return torch.cat([cols, rows], dim=-1).reshape(side * side, dim).float()


class PositionEmbedding(nn.Module):
    """The frozen table of :func:`sincos_table` for patch grids up to ``max_side`` per side."""

    def __init__(self, max_side: int, hidden: int) -> None:
        super().__init__()
        self.max_side = max_side
        self.pos_embed = nn.Parameter(sincos_table(max_side, hidden), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def latent_position_ids(h: int, w: int, max_side: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h * w,) table indices of an h x w patch grid, row-major, as the reference extrapolates them: the grid's
    top-left corner of the table, whatever the image size."""
    rows = torch.arange(h, device=device)[:, None] * max_side
    return (rows + torch.arange(w, device=device)).flatten()
