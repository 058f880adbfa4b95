"""DiffWave (Kong et al. 2021, "DiffWave: A Versatile Diffusion Model for Audio Synthesis", Fig. 2).

A non-causal WaveNet over a waveform x ``(B, 1, N)``: a 1x1 input conv, then ``L`` residual layers with
dilations 1, 2, ..., 2^(cycle-1), repeating. Layer i sees h plus a projection of the noise-level (and
class) embedding, runs a kernel-3 dilated conv to 2C channels (plus a 1x1 projection of the upsampled
mel-spectrogram in vocoder mode), gates it with tanh(a) * sigmoid(b) and splits a 1x1 conv into a
residual (back into h) and a skip (summed over layers):

    x -> conv 1x1, ReLU -> [h += res_i / sqrt(2); skip += skip_i] x L -> skip / sqrt(L)
      -> ReLU -> conv 1x1 -> ReLU -> conv 1x1 (zero-initialised) -> (B, 1, N)

The output conv starts at zero, so the network outputs exactly zero at initialisation. Each output
sample sees ``receptive_field = 1 + 2 * sum(dilations)`` input samples centred on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.nets.layers import timestep_embedding

PRESETS: tuple[str, ...] = ("tiny", "small", "base")


@dataclass
class WaveNetConfig:
    residual_channels: int = 64  # C
    residual_layers: int = 30  # L
    dilation_cycle: int = 10  # dilations 1, 2, ..., 2^(cycle-1), repeating
    embed_dim: int = 512  # width of the step-embedding MLP (512 in the paper); sinusoid dim = embed_dim // 4
    num_classes: int | None = None  # None: unconditional; else ids 0..num_classes-1 and the null id num_classes
    mel_bins: int | None = None  # None: no local conditioner; else a vocoder over mel (B, mel_bins, N // hop)
    hop: int = 256  # waveform samples per mel frame

    def __post_init__(self):
        for name in ("residual_channels", "residual_layers", "dilation_cycle", "hop"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim < 8:
            raise ValueError(f"embed_dim must be >= 8, got {self.embed_dim}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be None (unconditional) or >= 1, got {self.num_classes}")
        if self.mel_bins is not None and self.mel_bins < 1:
            raise ValueError(f"mel_bins must be None (no mel conditioning) or >= 1, got {self.mel_bins}")

    @property
    def dilations(self) -> tuple[int, ...]:
        return tuple(2 ** (i % self.dilation_cycle) for i in range(self.residual_layers))

    @property
    def receptive_field(self) -> int:
        return 1 + 2 * sum(self.dilations)

    @classmethod
    def preset(cls, name: str, num_classes: int | None = None, **kw) -> WaveNetConfig:
        """Named sizes: "tiny" (tests, 16 ch x 6 layers, 24k params), "small" (CPU, 64 ch x 16 layers,
        0.88M), "base" (the paper's C=64, L=30: 2.31M; 2.62M as an 80-bin vocoder).
        ``kw`` (mel_bins, hop) pass through."""
        if name == "tiny":
            size = dict(residual_channels=16, residual_layers=6, dilation_cycle=3, embed_dim=64)
        elif name == "small":
            size = dict(residual_channels=64, residual_layers=16, dilation_cycle=8, embed_dim=256)
        elif name == "base":
            size = dict(residual_channels=64, residual_layers=30, dilation_cycle=10, embed_dim=512)
        else:
            raise ValueError(f"unknown WaveNet preset {name!r}; allowed: {', '.join(PRESETS)}")
        return cls(num_classes=num_classes, **size, **kw)


def upsample_stages(hop: int) -> tuple[int, ...]:
    """Split ``hop`` into at most two strides, as close as possible (256 -> (16, 16) as in the paper)."""
    a = max(d for d in range(1, math.isqrt(hop) + 1) if hop % d == 0)
    return tuple(s for s in (hop // a, a) if s > 1)


class MelUpsampler(nn.Module):
    """Transposed 2-D convs over (mel_bins, frames), stride s in time: ``(B, M, T)`` -> ``(B, M, T * hop)``."""

    def __init__(self, hop: int):
        super().__init__()
        # kernel 2s (s even) or 2s - 1 (s odd), padding s // 2: output length exactly T * s
        self.convs = nn.ModuleList(
            nn.ConvTranspose2d(1, 1, (3, 2 * s - s % 2), stride=(1, s), padding=(1, s // 2))
            for s in upsample_stages(hop)
        )

    def forward(self, mel: Tensor) -> Tensor:
        h = mel[:, None]  # (B, 1, M, T)
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.4)
        return h[:, 0]


class ResidualLayer(nn.Module):
    """h ``(B, C, N)``, emb ``(B, E)``, cond ``(B, M, N)`` or None -> (residual, skip), each ``(B, C, N)``."""

    def __init__(self, channels: int, dilation: int, embed_dim: int, mel_bins: int | None):
        super().__init__()
        self.emb = nn.Linear(embed_dim, channels)
        self.dilated = nn.Conv1d(channels, 2 * channels, 3, padding=dilation, dilation=dilation)
        self.cond = nn.Conv1d(mel_bins, 2 * channels, 1) if mel_bins is not None else None
        self.out = nn.Conv1d(channels, 2 * channels, 1)

    def forward(self, h: Tensor, emb: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        y = self.dilated(h + self.emb(emb)[:, :, None])  # (B, 2C, N)
        if cond is not None:
            y = y + self.cond(cond)
        a, b = y.chunk(2, dim=1)
        res, skip = self.out(torch.tanh(a) * torch.sigmoid(b)).chunk(2, dim=1)
        return (h + res) / math.sqrt(2.0), skip


class DiffWave(nn.Module):
    """x ``(B, 1, N)`` or ``(B, N)``, t ``(B,)``, labels ``(B,)`` or None, mel ``(B, M, N // hop)`` or None
    -> a tensor of x's shape."""

    def __init__(self, config: WaveNetConfig):
        super().__init__()
        self.config = cfg = config
        C, E = cfg.residual_channels, cfg.embed_dim
        self.time_embed = nn.Sequential(nn.Linear(E // 4, E), nn.SiLU(), nn.Linear(E, E), nn.SiLU())
        self.label_embed = nn.Embedding(cfg.num_classes + 1, E) if cfg.num_classes is not None else None
        self.upsampler = MelUpsampler(cfg.hop) if cfg.mel_bins is not None else None
        self.conv_in = nn.Conv1d(1, C, 1)
        self.layers = nn.ModuleList(ResidualLayer(C, d, E, cfg.mel_bins) for d in cfg.dilations)
        self.skip_proj = nn.Conv1d(C, C, 1)
        self.conv_out = nn.Conv1d(C, 1, 1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def embed(self, t: Tensor, labels: Tensor | None, x: Tensor) -> Tensor:
        """Noise level (B,) (+ class (B,)) -> ``(B, E)``; labels None with num_classes set -> null class."""
        cfg, B = self.config, x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != B):
            raise ValueError(f"t must have shape () or ({B},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t.reshape(-1).expand(B), cfg.embed_dim // 4).to(x.dtype))
        if self.label_embed is None:
            if labels is not None:
                raise ValueError("labels were given to a DiffWave built without num_classes (unconditional)")
            return emb
        if labels is None:
            labels = torch.full((B,), cfg.num_classes, dtype=torch.long, device=x.device)
        if labels.shape != (B,) or labels.dtype != torch.long:
            raise ValueError(f"labels must be a long tensor of shape ({B},), got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > cfg.num_classes):
            raise ValueError(f"labels must lie in 0..{cfg.num_classes} (the last is the null class)")
        return emb + self.label_embed(labels)

    def conditioner(self, mel: Tensor | None, x: Tensor) -> Tensor | None:
        """mel ``(B, M, N // hop)`` -> ``(B, M, N)``."""
        cfg, (B, _, N) = self.config, x.shape
        if mel is None:
            if self.upsampler is not None:
                raise ValueError(
                    f"a DiffWave built with mel_bins={cfg.mel_bins} needs mel (B, {cfg.mel_bins}, N // {cfg.hop})"
                )
            return None
        if self.upsampler is None:
            raise ValueError("mel was given to a DiffWave built without mel_bins")
        if N % cfg.hop or mel.shape != (B, cfg.mel_bins, N // cfg.hop):
            raise ValueError(
                f"mel must have shape (B, mel_bins, N // hop) = ({B}, {cfg.mel_bins}, {N // cfg.hop}) with N a "
                f"multiple of hop={cfg.hop}; got mel {tuple(mel.shape)} for N={N}"
            )
        return self.upsampler(mel.to(x.dtype))

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None, mel: Tensor | None = None) -> Tensor:
        flat = x.ndim == 2
        if flat:
            x = x[:, None]
        if x.ndim != 3 or x.shape[1] != 1:
            raise ValueError(f"x must have shape (B, 1, N) or (B, N), got {tuple(x.shape)}")
        emb, cond = self.embed(t, labels, x), self.conditioner(mel, x)
        h = F.relu(self.conv_in(x))  # (B, C, N)
        skip = torch.zeros_like(h)
        for layer in self.layers:
            h, s = layer(h, emb, cond)
            skip = skip + s
        h = F.relu(self.skip_proj(F.relu(skip / math.sqrt(len(self.layers)))))
        out = self.conv_out(h)  # (B, 1, N)
        return out[:, 0] if flat else out
