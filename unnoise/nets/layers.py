"""Blocks shared by the networks: embeddings, convolutions, normalisation, dropout, self- and cross-attention."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) steps or noise levels (Vaswani et al. 2017).

    ``t``: ``(B,)`` -> ``(B, dim)``; [cos | sin] halves with frequencies max_period^(-i / half).
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with ADM's 32 groups when ``channels`` allows, else its largest divisor below 32."""
    return nn.GroupNorm(max(g for g in range(1, 33) if channels % g == 0), channels)


def conv(dims: int, c_in: int, c_out: int, kernel: int, **kw) -> nn.Module:
    """A 1-D or 2-D convolution; a 1x1 one (no other settings) runs as a batched matmul (:class:`Pointwise2d`)."""
    if kernel == 1 and not kw:
        return (Pointwise1d if dims == 1 else Pointwise2d)(c_in, c_out, 1)
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(c_in, c_out, kernel, **kw)


class _Pointwise:
    """A 1x1 convolution computed as ``bias + W @ x`` per sample: ``(B, c_in, *S)`` -> ``(B, c_out, *S)``.

    The same function, parameters, names and initialisation as the convolution, but in bf16 the CPU's
    convolution (oneDNN) reorders its input, output and gradients to channels-last and back; the
    batched matmul reads NCHW as it is. A 96 -> 32 skip conv at 28x28, batch 64, bf16, forward and
    backward: 17 ms against 28-45 ms. (baddbmm is on autocast's bf16 list, like conv2d.)
    """

    weight: Tensor
    bias: Tensor

    def forward(self, x: Tensor) -> Tensor:
        B, C = x.shape[:2]
        w = self.weight.reshape(1, -1, C).expand(B, -1, -1)  # (B, c_out, c_in), no copy
        out = torch.baddbmm(self.bias.reshape(1, -1, 1), w, x.reshape(B, C, -1))  # (B, c_out, prod(S))
        return out.reshape(B, -1, *x.shape[2:])


class Pointwise1d(_Pointwise, nn.Conv1d):
    """:class:`_Pointwise` with ``nn.Conv1d``'s parameters."""


class Pointwise2d(_Pointwise, nn.Conv2d):
    """:class:`_Pointwise` with ``nn.Conv2d``'s parameters."""


def zero_init(module: nn.Module) -> nn.Module:
    """``module`` with every parameter set to 0: a residual branch ending in it starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Dropout(nn.Module):
    """Element-wise dropout (Srivastava et al. 2014) drawing its mask from 16-bit random words.

    ``nn.Dropout`` draws one float per element; on a CPU that costs about 12x a SiLU over the same
    tensor and was 8% of a U-Net training step. Here one 64-bit draw gives four 16-bit
    uniforms, and an element is dropped when its uniform falls below ``round(p * 65536)``: the same
    element-wise Bernoulli mask at a quarter of the draws. P(drop) is ``p`` rounded to 1/65536 (0.1 ->
    0.100006) and the kept elements are scaled by the exact ``1 / P(keep)``, so ``E[out] = x``.
    Masks come from the global generator, as ``nn.Dropout``'s do. ``x``: any shape -> same shape.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1 - 2**-17:  # P(drop), p rounded to 1/65536, must stay below 1
            raise ValueError(f"dropout must lie in [0, 1) and round below 1 in steps of 1/65536, got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        threshold = round(self.p * 65536)
        if not self.training or threshold == 0:
            return x
        n = x.numel()
        # 64 uniform bits per word (random_() would leave the sign bit 0), viewed as four int16 uniforms
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        cut = threshold - 32768  # int16 uniforms run over [-32768, 32767]: keep u >= cut
        # the mask in x's dtype, 1 where kept, by integer clamping: {<= cut - 1, >= cut} -> {0, 1}. A bool
        # mask (where(keep, x, 0), x * keep) runs ~9x slower than a same-dtype product on a CPU: at
        # 64 x 32 x 28 x 28 in bf16, forward and backward, 1.0 ms against 3.0 ms
        keep = words.view(torch.int16)[:n].clamp_(cut - 1, cut).sub_(cut - 1).to(x.dtype).view(x.shape)
        return (x * keep).mul_(65536 / (65536 - threshold))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def channel_major_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``v softmax(q^T k / sqrt(d))^T`` per head: q ``(B, heads, d, N)``, k and v ``(B, heads, d, L)`` ->
    ``(B, heads, d, N)``; ``mask`` ``(B, L)`` bool, True where a key may be attended to.

    The layout a 1x1 conv produces, kept to the end, so the result reshapes to ``(B, C, N)`` with no
    copy. Plain matmuls rather than ``scaled_dot_product_attention``: on a CPU its fused kernels need
    a stride-1 last axis (this layout would need three copies, and flash attention at 49 positions
    was 3x slower still), and its math fallback casts bf16 to float32 and back and checks every row
    for -inf. Self-attention at 7x7, 64 channels, batch 64, bf16, forward and backward: 2.6 ms
    against 6.3 ms. Under bf16 autocast the scores round to bf16 before the softmax (as in diffusers'
    attention without SDPA): relative error against float64 0.5% to 1.0% for logits of sd 1 to 6,
    where SDPA's float32 fallback gives 0.35% to 0.6%; float32 scores would cost 1.6x the time.
    """
    scores = torch.matmul(q.transpose(-1, -2) * q.shape[-2] ** -0.5, k)  # (B, heads, N, L)
    if mask is not None:
        scores.masked_fill_(~mask[:, None, None, :], float("-inf"))  # matmul saves its inputs, not scores
    return torch.matmul(v, scores.softmax(dim=-1).transpose(-1, -2))


class Attention(nn.Module):
    """Multi-head self-attention over the H*W (or N) positions: GroupNorm, qkv 1x1, attention, 1x1 (zero), residual.

    With ``context_dim``, a :class:`CrossAttention` to a context ``(B, L, context_dim)`` follows, as in
    LDM's transformer block (self-attention, then cross-attention); it is the submodule ``cross``, so
    the self-attention's parameter names are the same with or without it.
    """

    def __init__(
        self, channels: int, num_heads: int, dims: int = 2, context_dim: int | None = None, positions: int = 0
    ):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = conv(dims, channels, 3 * channels, 1)
        self.proj = zero_init(conv(dims, channels, channels, 1))
        self.cross = None if context_dim is None else CrossAttention(channels, context_dim, num_heads, dims, positions)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        B, C = x.shape[:2]
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, -1).unbind(1)
        h = x + self.proj(channel_major_attention(q, k, v).reshape(x.shape))  # heads' channels in order
        return h if self.cross is None else self.cross(h, context, mask)


class CrossAttention(nn.Module):
    """Multi-head cross-attention from the H*W (or N) positions to L context tokens (LDM eq. 3), residual.

    ``Q = W_Q GroupNorm(h)`` (1x1), ``K = W_K c``, ``V = W_V c`` (linear); ``softmax(Q K^T / sqrt(d)) V``
    per head, then a 1x1 projection that starts at zero. ``h`` ``(B, C, H, W)``, ``context`` ``(B, L,
    context_dim)``, ``mask`` ``(B, L)`` bool, True for real tokens: padded tokens get no attention weight,
    and a row without any real token gets no cross-attention at all (its output is ``h``).

    With ``positions`` = F > 0 the queries also see where they are: ``Q = W_Q GroupNorm(h) + W_P phi(p)``,
    phi the Fourier features sin, cos(pi 2^k p), k < F, of each position's coordinates in [-1, 1] (as in
    NeRF's positional encoding). A prompt that places objects ("a bag in the top left") is matched by
    where a query is; without it a query knows its place only through what the convolutions' zero
    padding lets through. ``W_P`` starts at zero, so the module starts as the one without it.
    """

    def __init__(self, channels: int, context_dim: int, num_heads: int, dims: int = 2, positions: int = 0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} attention heads")
        if positions < 0:
            raise ValueError(f"positions (Fourier frequencies per axis) must be >= 0, got {positions}")
        self.num_heads, self.positions = num_heads, positions
        self.norm = group_norm(channels)
        self.q = conv(dims, channels, channels, 1)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = zero_init(conv(dims, channels, channels, 1))
        self.pos = zero_init(nn.Linear(2 * dims * positions, channels, bias=False)) if positions else None

    def position_features(self, size: Sequence[int], device=None) -> Tensor:
        """phi of every position of a feature map of ``size`` (H, W or N), row-major: ``(prod(size), 2 * dims * F)``."""
        axes = [(2 * torch.arange(n, device=device, dtype=torch.float32) + 1) / n - 1 for n in size]  # centres
        p = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(size))  # (HW, dims)
        angles = p[..., None] * (math.pi * 2.0 ** torch.arange(self.positions, device=device))  # (HW, dims, F)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | None = None) -> Tensor:
        B, C, heads = x.shape[0], x.shape[1], self.num_heads
        q = self.q(self.norm(x)).reshape(B, heads, C // heads, -1)  # (B, heads, d, H*W)
        if self.pos is not None:
            where = self.pos(self.position_features(x.shape[2:], x.device).to(self.pos.weight.dtype))  # (H*W, C)
            q = q + where.to(q.dtype).reshape(-1, heads, C // heads).permute(1, 2, 0)
        k, v = self.kv(context).reshape(B, -1, 2, heads, C // heads).permute(2, 0, 3, 4, 1)  # (B, heads, d, L)
        if mask is None:
            return x + self.proj(channel_major_attention(q, k, v).reshape(x.shape))
        real = mask.any(dim=1)  # (B,): a fully padded row would softmax over nothing (NaN)
        h = self.proj(channel_major_attention(q, k, v, mask | ~real[:, None]).reshape(x.shape))
        return x + h * real.reshape(B, *(1,) * (x.ndim - 1)).to(h.dtype)
