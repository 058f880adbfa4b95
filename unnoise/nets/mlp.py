"""A residual MLP for low-dimensional data (the 2-D demo, toy experiments)."""

from __future__ import annotations

from torch import Tensor, nn

from unnoise.nets.layers import timestep_embedding


class ResidualMLP(nn.Module):
    """x ``(B, dim)`` and t ``(B,)`` -> ``(B, out_dim)``; t enters every block through its embedding."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 64, out_dim: int | None = None):
        super().__init__()
        self.emb_dim = emb_dim
        self.inp = nn.Linear(dim, hidden)
        self.emb = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, out_dim or dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        e = self.emb(timestep_embedding(t, self.emb_dim).to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + e)
        return self.out(h)
