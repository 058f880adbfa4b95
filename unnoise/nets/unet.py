"""The ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"; improved-diffusion's UNetModel).

The network maps a noisy image x ``(B, C, H, W)``, a noise-conditioning input t ``(B,)`` (a timestep or
EDM's c_noise: the denoiser wrapper decides which) and optional class labels ``(B,)`` to a tensor of x's
shape (``2C`` channels with a learned variance). At each level of the down path: ``num_res_blocks``
residual blocks (each followed by self-attention where the feature map has a configured size), then a
strided-conv downsample; a res-attn-res middle; an up path that mirrors it with one more block per
level, each block eating one skip activation of the down path, concatenated on channels:

    x -> conv_in -> [res (attn)] x N, down -> ... -> res attn res -> [cat skip, res (attn)] x (N+1), up -> ... -> out

Every residual branch ends in a zero-initialised layer and so does the output conv: at initialisation
each block is the identity on its skip path and the network outputs exactly zero.

``dims=1`` builds the same network over sequences ``(B, C, N)`` (a waveform U-Net, as in CRASH and
audio-diffusion-pytorch), and ``factor`` sets the down/upsampling per level: a 1-s, 8-kHz clip with
``factor=4`` runs most layers at 1/16 to 1/64 of the sample rate, and attention at the lowest level
sees the whole word.

``context_dim`` adds text conditioning as in latent diffusion (Rombach et al. 2022, sec. 3.3): each
self-attention block gains a cross-attention (its submodule ``cross``) whose keys and values are
projections of a context ``(B, L, context_dim)`` (e.g. a text encoder's token features), with a key
padding mask ``(B, L)``. Its output projection starts at zero, like every residual branch, so a
state dict of the U-Net without context loads (``strict=False``, only ``.cross.`` keys missing) into
one with it and computes the same function; with ``context_dim=None`` (the default) no module is
added: parameter names and outputs are those of the U-Net before cross-attention existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.nets.layers import Attention, CrossAttention, Dropout, conv, group_norm, timestep_embedding, zero_init

Preset = Literal["tiny", "small", "cifar"]
PRESETS: tuple[str, ...] = ("tiny", "small", "cifar")


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # channels at level i: base_channels * channel_mults[i]
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes (H) that get self-attention
    num_heads: int = 4
    head_channels: int | None = None  # when set, heads = channels // head_channels (overrides num_heads)
    dropout: float = 0.1
    num_classes: int | None = None  # None: unconditional; else ids 0..num_classes-1 and the null id num_classes
    learned_variance: bool = False  # output [prediction, v]: 2 * in_channels (Nichol & Dhariwal 2021)
    dims: int = 2  # 2: images (B, C, H, W); 1: sequences such as waveforms (B, C, N)
    factor: int = 2  # down/upsampling factor between levels (each spatial axis)
    context_dim: int | None = None  # None: no cross-attention; else every attention block also attends to context
    context_positions: int = 0  # Fourier frequencies per axis in cross-attention queries (CrossAttention)
    cross_attention_resolutions: tuple[int, ...] = ()  # sizes (H) that get cross-attention alone (no self-attention)

    def __post_init__(self):
        # lists (e.g. from config.json) become tuples, so configs compare and hash alike
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.cross_attention_resolutions = tuple(self.cross_attention_resolutions)
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}")
        if self.dims not in (1, 2):
            raise ValueError(f"dims must be 1 (sequences) or 2 (images), got {self.dims}")
        if self.factor < 2:
            raise ValueError(f"factor must be >= 2, got {self.factor}")
        total = self.factor ** (len(self.channel_mults) - 1)
        if self.image_size < 1 or self.image_size % total:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by factor**(len(channel_mults) - 1) = {total} "
                f"(factor={self.factor}, channel_mults={self.channel_mults}); allowed: positive multiples of {total}"
            )
        bad = [r for r in self.attention_resolutions if r not in self.resolutions]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are no feature-map size here; allowed: {self.resolutions}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None (unconditional) or >= 1, got {self.num_classes}")
        if self.context_dim is not None and self.context_dim < 1:
            raise ValueError(f"context_dim must be None (no cross-attention) or >= 1, got {self.context_dim}")
        if self.context_positions < 0 or (self.context_positions and self.context_dim is None):
            raise ValueError(f"context_positions must be >= 0 (0 without context_dim), got {self.context_positions}")
        free = [r for r in self.resolutions if r not in self.attention_resolutions] if self.context_dim else []
        if not set(self.cross_attention_resolutions) <= set(free):  # the sizes with self-attention cross-attend too
            raise ValueError(
                f"cross_attention_resolutions {self.cross_attention_resolutions} need context_dim and sizes without "
                f"self-attention; allowed: {free}"
            )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size at each level of the down path, e.g. 28 with 3 levels -> (28, 14, 7)."""
        return tuple(self.image_size // self.factor**level for level in range(len(self.channel_mults)))

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learned_variance else 1)

    @classmethod
    def preset(cls, name: Preset, image_size: int, in_channels: int, num_classes: int | None = None) -> UNetConfig:
        """Named sizes: "tiny" (tests, 0.19M params), "small" (8x8 digits, 28x28 Fashion-MNIST on a CPU,
        1.7M), "cifar" (32x32, DDPM's CIFAR-10 layout with ADM's scale-shift norm, 38.3M)."""
        if name == "tiny":
            kw = dict(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, dropout=0.0, num_heads=2)
        elif name == "small":
            kw = dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2, dropout=0.1, num_heads=4)
        elif name == "cifar":
            kw = dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, dropout=0.1, head_channels=64)
        else:
            raise ValueError(f"unknown U-Net preset {name!r}; allowed: {', '.join(PRESETS)}")
        # attention at the lowest resolution (tiny, small), at 16x16 like DDPM and ADM (cifar)
        lowest = image_size >> (len(kw["channel_mults"]) - 1)
        attention = (16,) if name == "cifar" else (lowest,)
        return cls(image_size, in_channels, attention_resolutions=attention, num_classes=num_classes, **kw)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm, scale-shift by the embedding -> SiLU -> dropout -> conv3x3 (zero).

    ``h`` ``(B, c_in, H, W)``, ``emb`` ``(B, emb_dim)`` -> ``(B, c_out, H, W)`` (or ``(B, c, N)`` with dims=1).
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float, dims: int = 2):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), conv(dims, c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)  # -> [scale, shift]
        self.norm2, self.drop = group_norm(c_out), Dropout(dropout)  # 4x cheaper masks than nn.Dropout's
        self.conv2 = zero_init(conv(dims, c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else conv(dims, c_in, c_out, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        scale, shift = self.emb(F.silu(emb)).reshape(h.shape[0], -1, *(1,) * (h.ndim - 2)).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift  # ADM's "use_scale_shift_norm"
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Downsample(nn.Sequential):
    """Strided conv: ``(B, c, H, W)`` -> ``(B, c, H/f, W/f)``; kernel 2f - 1 (3 for f = 2) covers every input."""

    def __init__(self, channels: int, dims: int = 2, factor: int = 2):
        super().__init__(conv(dims, channels, channels, 2 * factor - 1, stride=factor, padding=factor - 1))


class Upsample(nn.Module):
    """Nearest-neighbour x f, then conv3x3: ``(B, c, H, W)`` -> ``(B, c, fH, fW)``, computed as one transposed conv.

    Output ``f i + a`` of the 3-tap conv over the upsampled axis reads input ``i`` through every tap that
    lands in its block, and ``i - 1`` (a = 0) or ``i + 1`` (a = f - 1) through the one that leaves it. So
    the same function is a transposed conv (stride f, padding 1) with the f + 2 taps ``[w1, w0 + w1, w-1
    + w0 + w1 (f - 2 times), w-1 + w0, w-1]`` per axis (:func:`nearest_conv_kernel`): 4 taps per output
    instead of 9 at f = 2, and no upsampled copy. The parameter is still the 3x3 conv's (``conv``).
    """

    def __init__(self, channels: int, dims: int = 2, factor: int = 2):
        super().__init__()
        self.factor, self.dims = factor, dims
        self.conv = conv(dims, channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        kernel = nearest_conv_kernel(self.conv.weight, self.factor).transpose(0, 1)  # (c_in, c_out, f+2, ...)
        transpose = F.conv_transpose1d if self.dims == 1 else F.conv_transpose2d
        return transpose(x, kernel, self.conv.bias, stride=self.factor, padding=1)


def nearest_conv_kernel(weight: Tensor, factor: int) -> Tensor:
    """The ``(c_out, c_in, f + 2, ...)`` taps of a transposed conv (stride f, padding 1) that equals
    nearest-neighbour upsampling by f followed by the 3-tap conv ``weight`` ``(c_out, c_in, 3, ...)``.

    Sums and concatenations only (no matmul), so under autocast the taps are summed in ``weight``'s dtype.
    """
    for axis in range(2, weight.ndim):
        before, centre, after = weight.split(1, dim=axis)  # taps at offsets -1, 0, +1
        taps = [after, centre + after] + [before + centre + after] * (factor - 2) + [before + centre, before]
        weight = torch.cat(taps, dim=axis)
    return weight


class Stage(nn.Sequential):
    """Layers run in order; residual blocks also receive the embedding (ADM's TimestepEmbedSequential),
    attention blocks the context and its mask."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, (Attention, CrossAttention)):
                h = layer(h, context, mask)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021): x ``(B, C, H, W)``, t ``(B,)``, labels ``(B,)`` or None -> ``(B, C', H, W)``
    (``(B, C, N)`` -> ``(B, C', N)`` with ``config.dims == 1``).

    ``C' = C``, or ``2C`` (``[prediction, v]``) with ``config.learned_variance``. With ``config.context_dim``
    it also takes ``context`` ``(B, L, context_dim)`` and an optional ``context_mask`` ``(B, L)`` (True: real token).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        base, emb_dim, dims = cfg.base_channels, 4 * cfg.base_channels, cfg.dims

        def heads(channels: int) -> int:
            return channels // cfg.head_channels if cfg.head_channels else cfg.num_heads

        def attention(channels: int) -> Attention:
            return Attention(channels, heads(channels), dims, cfg.context_dim, cfg.context_positions)

        def stage(c_in: int, c_out: int, size: int) -> Stage:
            res = ResBlock(c_in, c_out, emb_dim, cfg.dropout, dims)
            if size in cfg.attention_resolutions:
                return Stage(res, attention(c_out))
            if size in cfg.cross_attention_resolutions:  # attends to the prompt without the cost of self-attention
                return Stage(res, CrossAttention(c_out, cfg.context_dim, heads(c_out), dims, cfg.context_positions))
            return Stage(res)

        # noise-level (and class) embedding, (B,) -> (B, emb_dim); the last class id is the null class
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None

        # down path; `skips` records the channels of each activation the up path will concatenate
        self.conv_in = conv(dims, cfg.in_channels, base, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [base], base
        for level, (mult, size) in enumerate(zip(cfg.channel_mults, cfg.resolutions, strict=True)):
            for _ in range(cfg.num_res_blocks):
                self.down.append(stage(ch, base * mult, size))
                ch = base * mult
                skips.append(ch)
            if level < len(cfg.channel_mults) - 1:
                self.down.append(Stage(Downsample(ch, dims, cfg.factor)))
                skips.append(ch)

        self.middle = Stage(
            ResBlock(ch, ch, emb_dim, cfg.dropout, dims),
            attention(ch),
            ResBlock(ch, ch, emb_dim, cfg.dropout, dims),
        )

        # up path: one more block per level than the down path, so each skip is used exactly once
        self.up = nn.ModuleList()
        for level, (mult, size) in reversed(list(enumerate(zip(cfg.channel_mults, cfg.resolutions, strict=True)))):
            for i in range(cfg.num_res_blocks + 1):
                block = stage(ch + skips.pop(), base * mult, size)
                ch = base * mult
                if level > 0 and i == cfg.num_res_blocks:
                    block.append(Upsample(ch, dims, cfg.factor))
                self.up.append(block)
        assert not skips

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_init(conv(dims, ch, cfg.out_channels, 3, padding=1)))

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        cfg = self.config
        self._check_context(x, context, context_mask)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # () or (B,) -> (B,)
        emb = self.time_embed(timestep_embedding(t, cfg.base_channels).to(x.dtype))  # (B, emb_dim)
        if self.label_embed is not None:
            if labels is None:  # unconditional call: every sample gets the null class
                labels = torch.full((x.shape[0],), cfg.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_embed(labels)
        elif labels is not None:
            raise ValueError("labels were given to a U-Net built without num_classes (unconditional)")

        h = self.conv_in(x)  # (B, base, H, W)
        hs = [h]
        for block in self.down:
            h = block(h, emb, context, context_mask)
            hs.append(h)
        h = self.middle(h, emb, context, context_mask)  # (B, base * mults[-1], H / 2^(L-1), W / 2^(L-1))
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)

    def _check_context(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> None:
        """One line for a context this U-Net cannot take: none where it needs one, or a wrong shape."""
        dim = self.config.context_dim
        if dim is None:
            if context is not None or mask is not None:
                raise ValueError("context was given to a U-Net built without context_dim (no cross-attention)")
            return
        if context is None or context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"this U-Net attends to a context of shape ({x.shape[0]}, L, {dim}); got {got}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != context.shape[:2]):
            raise ValueError(
                f"context_mask must be bool {tuple(context.shape[:2])} (True: a real token); "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
