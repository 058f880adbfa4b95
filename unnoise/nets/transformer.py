"""The Diffusion-LM denoiser (Li et al. 2022): a bidirectional transformer over continuous word embeddings.

The network maps a noisy sequence of word embeddings x ``(B, L, embed_dim)``, a noise-conditioning input
t ``(B,)`` (a timestep or EDM's c_noise: the denoiser wrapper decides which) and optional conditioning
token ids ``(B, K)`` (e.g. the field values of a meaning representation) to a tensor of x's shape:

    x -> Linear(embed_dim, width) + position + time  ->  [cond tokens | x tokens]
      -> [pre-LN self-attention (no causal mask), pre-LN MLP] x depth
      -> drop the cond tokens -> LayerNorm -> Linear(width, embed_dim) (zero-initialised)

The time embedding is simply added to every position, as in the Diffusion-LM code (no adaLN): the
simplest robust choice, and attention spreads it anyway. Conditioning tokens are embedded (plus their
own learned positions) and prepended to the sequence; id 0 is padding and is masked out of every key,
so an all-zero ``cond`` (or ``None``) is the null condition of classifier-free guidance, and trailing
padding changes nothing. The output projection is zero-initialised: at init the net outputs exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.nets.layers import timestep_embedding

Preset = Literal["tiny", "small", "base"]
PRESETS: tuple[str, ...] = ("tiny", "small", "base")


@dataclass
class TransformerConfig:
    seq_len: int = 64  # the longest x sequence (learned positions)
    embed_dim: int = 16  # size of the word embeddings the diffusion runs on (16-128 in Diffusion-LM)
    width: int = 256  # model dimension
    depth: int = 12
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    cond_vocab: int | None = None  # None: unconditional; else ids 0..cond_vocab-1 with 0 = padding / null
    cond_len: int = 0  # the most conditioning tokens per sample

    def __post_init__(self):
        if min(self.seq_len, self.embed_dim, self.width, self.depth, self.heads, self.mlp_ratio) < 1:
            raise ValueError(f"seq_len, embed_dim, width, depth, heads and mlp_ratio must be >= 1, got {self}")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} does not split into heads={self.heads} attention heads")
        if self.cond_vocab is not None and (self.cond_vocab < 2 or self.cond_len < 1):
            raise ValueError(
                f"with cond_vocab set, need cond_vocab >= 2 (id 0 is padding) and cond_len >= 1; "
                f"got cond_vocab={self.cond_vocab}, cond_len={self.cond_len}"
            )
        if self.cond_vocab is None and self.cond_len != 0:
            raise ValueError(f"cond_len={self.cond_len} needs cond_vocab (None means unconditional, cond_len=0)")

    @classmethod
    def preset(
        cls, name: Preset, seq_len: int, embed_dim: int, cond_vocab: int | None = None, cond_len: int = 0
    ) -> TransformerConfig:
        """Named sizes: "tiny" (tests, 31k params), "small" (9.6M), "base" (25.8M) at seq_len=64, embed_dim=16."""
        if name == "tiny":
            kw = dict(width=32, depth=2, heads=2, dropout=0.0)
        elif name == "small":
            kw = dict(width=256, depth=12, heads=4, dropout=0.1)
        elif name == "base":
            kw = dict(width=512, depth=8, heads=8, dropout=0.1)
        else:
            raise ValueError(f"unknown transformer preset {name!r}; allowed: {', '.join(PRESETS)}")
        return cls(seq_len, embed_dim, cond_vocab=cond_vocab, cond_len=cond_len, **kw)


class Block(nn.Module):
    """Pre-LN transformer block: ``h + Attn(LN(h))``, then ``h + MLP(LN(h))``; ``(B, N, width)`` -> same.

    ``mask`` ``(B, 1, 1, N)`` bool, True where a key takes part, or None (all keys). No causal mask.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor | None) -> Tensor:
        B, N, C = h.shape
        qkv = self.qkv(self.norm1(h)).reshape(B, N, 3, self.heads, C // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, C/heads)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, C/heads)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, N, C)))
        return h + self.mlp(self.norm2(h))


class TextTransformer(nn.Module):
    """Diffusion-LM denoiser: x ``(B, L, embed_dim)``, t ``()`` / ``(B,)``, cond ``(B, K)`` / None -> x's shape.

    ``L <= seq_len``, ``K <= cond_len``; cond id 0 is padding (ignored), so all-zero cond == None == null.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        w = cfg.width
        self.in_proj = nn.Linear(cfg.embed_dim, w)
        self.pos = nn.Parameter(0.02 * torch.randn(cfg.seq_len, w))
        self.time_embed = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        if cfg.cond_vocab is not None:
            self.cond_embed = nn.Embedding(cfg.cond_vocab, w)
            self.cond_pos = nn.Parameter(0.02 * torch.randn(cfg.cond_len, w))
        else:
            self.cond_embed, self.cond_pos = None, None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, cfg.embed_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _check(self, x: Tensor, t: Tensor, cond: Tensor | None) -> None:
        cfg = self.config
        if x.ndim != 3 or not 1 <= x.shape[1] <= cfg.seq_len or x.shape[2] != cfg.embed_dim:
            raise ValueError(
                f"x must have shape (B, L, embed_dim={cfg.embed_dim}) with 1 <= L <= seq_len={cfg.seq_len}, "
                f"got {tuple(x.shape)}"
            )
        if t.numel() not in (1, x.shape[0]):
            raise ValueError(f"t must have shape () or (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        if cond is None:
            return
        if cfg.cond_vocab is None:
            raise ValueError("cond was given to a transformer built without cond_vocab (unconditional)")
        if cond.ndim != 2 or cond.shape[0] != x.shape[0] or cond.shape[1] > cfg.cond_len:
            raise ValueError(
                f"cond must have shape (B, K) = ({x.shape[0]}, K) with K <= cond_len={cfg.cond_len}, "
                f"got {tuple(cond.shape)}"
            )
        if cond.dtype.is_floating_point or cond.dtype.is_complex or cond.dtype == torch.bool:
            raise ValueError(f"cond must hold integer token ids, got dtype {cond.dtype}")

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        self._check(x, t, cond)
        B, L, _ = x.shape
        t = t.reshape(-1).expand(B)  # () or (B,) -> (B,)
        emb = self.time_embed(timestep_embedding(t, cfg.width).to(x.dtype))  # (B, width)
        h = self.in_proj(x) + self.pos[:L] + emb[:, None]  # (B, L, width)

        mask, K = None, 0
        if cond is not None and cond.shape[1] > 0:
            K = cond.shape[1]
            c = self.cond_embed(cond) + self.cond_pos[:K]  # (B, K, width)
            h = torch.cat([c, h], dim=1)  # (B, K + L, width)
            keep = torch.cat([cond != 0, cond.new_ones(B, L, dtype=torch.bool)], dim=1)  # (B, K + L)
            mask = keep[:, None, None, :]  # (B, 1, 1, K + L): padded cond tokens are no key
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, mask)
        return self.out(self.norm_out(h[:, K:]))  # (B, L, embed_dim)
