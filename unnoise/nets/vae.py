"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "LDM", sec. 3.1, app. G: AutoencoderKL).

An encoder maps an image x ``(B, C, H, W)`` in [-1, 1] to the parameters of a diagonal Gaussian
posterior ``q(z | x) = N(mean, diag(exp(logvar)))`` over latents z ``(B, z_channels, H/f, W/f)``
(``f = 2^(len(channel_mults) - 1)``; 56x56x1 -> 14x14x4 by default); a decoder maps z back to the
mean of a Gaussian likelihood ``p(x | z) = N(decode(z), sigma_x^2 I)``. Training minimises the
negative evidence lower bound (Kingma & Welling 2014), per image, in nats:

    -ELBO(x) = E_q[-log p(x | z)] + KL(q(z | x) || N(0, I))                     (recon + KL)
    -log p(x | z) = 1/2 sum_i [ (x_i - decode(z)_i)^2 / sigma_x^2 + log sigma_x^2 + log 2 pi ]
    KL = 1/2 sum_j [ mean_j^2 + exp(logvar_j) - 1 - logvar_j ]

with one-sample reparameterised estimates ``z = mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)``.

The decoder's scale sigma_x is one scalar. For any reconstruction, the -ELBO is smallest at
``sigma_x^2 = mean (x - decode(z))^2``, the mean squared error; with it the bound is tight in sigma_x
and the balance of reconstruction against KL follows from how well the decoder reconstructs, with
no hand-tuned weight. ``decoder_variance``:

- ``"optimal"`` (default): sigma_x^2 is that MSE, computed on each batch (the "optimal sigma-VAE" of
  Rybkin et al. 2021), floored at the variance (2/255)^2 / 12 of rounding to 256 levels. Chosen
  because a learned sigma_x moves by about the learning rate per Adam step, so from sigma_x = 1 it
  takes thousands of steps to reach the MSE, and meanwhile the KL term dominates (measured: after
  50 steps on fashion-scenes, Adam 1e-3, log sigma_x^2 had moved from 0 to -0.05 while log MSE was
  about -2.2);
- ``"learned"``: a parameter, initialised at ``logvar_init`` (LDM's loss also learns one scalar
  ``logvar``);
- ``"fixed"``: ``logvar_init`` always; a small fixed sigma_x is a beta-VAE with beta = 2 sigma_x^2 on
  a squared-error loss, for when the latents must keep more detail than the bound would pay for.

``kl_weight`` in :func:`vae_loss` reweights KL in the trained loss only (LDM uses 1e-6 beside a
perceptual loss); the reported -ELBO always weights it by 1.

The diffusion model sees ``z * scale_factor`` with ``scale_factor = 1 / std(z)`` over a batch of
training latents (:func:`latent_scale_factor`, LDM sec. 4.3.2), so latents have unit variance
like the pixel data the noise schedules were made for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.nets.layers import Attention, group_norm
from unnoise.nets.unet import Downsample, Upsample

__all__ = [
    "AutoencoderKL",
    "VAEConfig",
    "VAELoss",
    "gaussian_kl_standard",
    "gaussian_nll",
    "latent_scale_factor",
    "reparameterize",
    "vae_loss",
]

# LDM's DiagonalGaussianDistribution clamps logvar to this range: exp(+-) stays finite in float32
LOGVAR_RANGE = (-30.0, 20.0)
# the variance of rounding to 256 levels in [-1, 1], (2/255)^2 / 12: no 8-bit image is known better
MIN_DECODER_LOGVAR = math.log((2 / 255) ** 2 / 12)


@dataclass
class VAEConfig:
    image_size: int = 56
    in_channels: int = 1
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 4)  # channels per level; a 2x downsample between levels
    num_res_blocks: int = 1
    z_channels: int = 4
    attention: bool = True  # self-attention in the middle of encoder and decoder (LDM's mid.attn_1)
    decoder_variance: Literal["optimal", "learned", "fixed"] = "optimal"  # how sigma_x is set: module docstring
    logvar_init: float = 0.0  # log sigma_x^2 at initialisation ("learned") or always ("fixed")

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}")
        for name in ("in_channels", "base_channels", "num_res_blocks", "z_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size < 1 or self.image_size % self.factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**(len(channel_mults) - 1) = {self.factor}; "
                f"allowed: positive multiples of {self.factor}"
            )
        if self.decoder_variance not in ("optimal", "learned", "fixed"):
            raise ValueError(
                f"unknown decoder_variance {self.decoder_variance!r}; allowed: 'optimal', 'learned', 'fixed'"
            )
        if not LOGVAR_RANGE[0] <= self.logvar_init <= LOGVAR_RANGE[1]:
            raise ValueError(f"logvar_init must lie in {LOGVAR_RANGE}, got {self.logvar_init}")

    @property
    def factor(self) -> int:
        """Downsampling factor f of each spatial axis, image -> latent."""
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(z_channels, H/f, W/f)``, e.g. (4, 14, 14) for 56x56 images."""
        size = self.image_size // self.factor
        return (self.z_channels, size, size)

    @classmethod
    def preset(cls, name: Literal["tiny", "small"], image_size: int = 56, in_channels: int = 1) -> VAEConfig:
        """Named sizes: "tiny" (tests, f = 2) and "small" (56x56x1 -> 14x14x4 on a CPU, 0.68M parameters).

        "small" is the default config: on fashion-scenes, batch 32, Adam 2e-3, 240 CPU-seconds (one
        thread) gave a test PSNR of 23.3 dB (346 steps), against 19.3 dB (174 steps) for base_channels=32,
        channel_mults=(1, 2, 2) (0.95M), whose 32-channel full-resolution layers cost twice the time.
        """
        if name == "tiny":
            return cls(image_size, in_channels, base_channels=8, channel_mults=(1, 2), z_channels=2)
        if name == "small":
            return cls(image_size, in_channels)
        raise ValueError(f"unknown VAE preset {name!r}; allowed: 'tiny', 'small'")


class ResnetBlock(nn.Module):
    """LDM's ResnetBlock without a time embedding: GroupNorm -> SiLU -> conv3x3, twice, plus a (1x1) skip."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


def _middle(channels: int, attention: bool) -> nn.Sequential:
    attn = [Attention(channels, 1)] if attention else []
    return nn.Sequential(ResnetBlock(channels, channels), *attn, ResnetBlock(channels, channels))


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder: ``encode`` x ``(B, C, H, W)`` -> (mean, logvar) ``(B, z, H/f, W/f)``; ``decode`` z -> x."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = cfg = config
        chans = [cfg.base_channels * m for m in cfg.channel_mults]

        # encoder: conv_in, [res x N, down] per level, middle, norm -> SiLU -> conv to (mean, logvar)
        enc: list[nn.Module] = [nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)]
        ch = chans[0]
        for level, c in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                enc.append(ResnetBlock(ch, c))
                ch = c
            if level < len(chans) - 1:
                enc.append(Downsample(ch))
        enc += [_middle(ch, cfg.attention), group_norm(ch), nn.SiLU(), nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        # decoder: the mirror, one more res block per level (as LDM's Decoder)
        dec: list[nn.Module] = [nn.Conv2d(cfg.z_channels, ch, 3, padding=1), _middle(ch, cfg.attention)]
        for level, c in reversed(list(enumerate(chans))):
            for _ in range(cfg.num_res_blocks + 1):
                dec.append(ResnetBlock(ch, c))
                ch = c
            if level > 0:
                dec.append(Upsample(ch))
        dec += [group_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

        # log sigma_x^2 of p(x | z), when learned or fixed (a buffer, so it is saved either way)
        logvar = torch.tensor(float(cfg.logvar_init))
        if cfg.decoder_variance == "learned":
            self.decoder_logvar = nn.Parameter(logvar)
        elif cfg.decoder_variance == "fixed":
            self.register_buffer("decoder_logvar", logvar)

    def likelihood_logvar(self, x: Tensor, x_hat: Tensor) -> Tensor:
        """log sigma_x^2 of p(x | z) for this batch, a scalar: the optimum ``log mean (x - x_hat)^2``
        (floored at ``MIN_DECODER_LOGVAR``) with ``decoder_variance="optimal"``, else the stored one."""
        if self.config.decoder_variance != "optimal":
            return self.decoder_logvar
        return (x - x_hat).square().mean().log().clamp(min=MIN_DECODER_LOGVAR)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x): x ``(B, C, H, W)`` in [-1, 1] -> ``(mean, logvar)``, each ``(B, z_channels, H/f, W/f)``."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """The mean of p(x | z): z ``(B, z_channels, H/f, W/f)`` -> ``(B, C, H, W)``."""
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(decode(z), mean, logvar)`` with z drawn from q(z | x) by the reparameterisation."""
        mean, logvar = self.encode(x)
        return self.decode(reparameterize(mean, logvar, generator)), mean, logvar


def reparameterize(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z ~ N(mean, exp(logvar)) as ``mean + exp(logvar / 2) * eps``, eps ~ N(0, I) (Kingma & Welling 2014, eq. 10)."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + (0.5 * logvar).exp() * eps


def gaussian_kl_standard(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis: ``(B, ...)`` -> ``(B,)``, nats.

    ``1/2 sum (mean^2 + exp(logvar) - 1 - logvar)`` (Kingma & Welling 2014, app. B).
    """
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1)


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """-log N(x; mean, exp(logvar) I) summed over all but the batch axis: ``(B, ...)`` -> ``(B,)``, nats.

    ``1/2 sum ((x - mean)^2 exp(-logvar) + logvar + log 2 pi)``; ``logvar`` broadcasts (a scalar here).
    """
    logvar = torch.as_tensor(logvar, dtype=x.dtype, device=x.device).expand_as(x)
    return 0.5 * ((x - mean).square() * (-logvar).exp() + logvar + math.log(2 * math.pi)).flatten(1).sum(1)


@dataclass
class VAELoss:
    """Batch means of per-image terms, in nats: ``nelbo = recon + kl`` and ``loss = recon + kl_weight * kl``."""

    recon: Tensor  # E_q[-log p(x | z)], one-sample estimate
    kl: Tensor  # KL(q(z | x) || N(0, I)), exact
    nelbo: Tensor  # the negative ELBO, an upper bound on -log p(x) (a density: x is continuous here)
    loss: Tensor  # what training minimises
    decoder_logvar: Tensor  # the log sigma_x^2 it used


def vae_loss(
    vae: AutoencoderKL, x: Tensor, *, kl_weight: float = 1.0, generator: torch.Generator | None = None
) -> VAELoss:
    """-ELBO of x ``(B, C, H, W)`` in [-1, 1] under ``vae`` (module docstring), split into its terms."""
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    x_hat, mean, logvar = vae(x, generator)
    decoder_logvar = vae.likelihood_logvar(x, x_hat)
    recon = gaussian_nll(x, x_hat, decoder_logvar).mean()
    kl = gaussian_kl_standard(mean, logvar).mean()
    return VAELoss(recon, kl, nelbo=recon + kl, loss=recon + kl_weight * kl, decoder_logvar=decoder_logvar.detach())


@torch.no_grad()
def latent_scale_factor(
    vae: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 256,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> float:
    """LDM's ``scale_factor = 1 / std(z)`` over every element of the latents of ``images`` (in [-1, 1]).

    ``z`` is the posterior mean (default) or a draw from q(z | x) (``sample=True``, as LDM's
    ``get_first_stage_encoding``). Estimate it from the latents the diffusion will train on: under the
    full ELBO the posterior noise is large (on fashion-scenes after 378 steps: std 1.05 for draws,
    0.72 for means), so a factor from draws leaves the scaled means at std 0.69, not 1.
    """
    if len(images) < 1:
        raise ValueError("latent_scale_factor needs at least one image")
    zs = []
    for batch in images.split(batch_size):
        mean, logvar = vae.encode(batch)
        zs.append(reparameterize(mean, logvar, generator) if sample else mean)
    std = torch.cat(zs).double().flatten().std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"the latents have std {std}: no scale factor makes them unit-variance")
    return 1.0 / std
