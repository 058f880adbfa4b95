"""How text-to-image batches enter and leave the latent diffusion (LDM, Rombach et al. 2022, sec. 3.2-3.3).

Images: uint8 pixels -> [-1, 1] -> the VAE's posterior mean (or a sample of it) times the latent scale
factor, so the diffusion runs on ``z = scale_factor * E(x)`` ``(B, z_channels, h, w)`` of unit variance;
back: ``x = D(z / scale_factor)`` -> uint8 (:class:`LatentCodec`).

Prompts: the condition of the trainer and of guidance is a long tensor of token ids ``(B, max_len)``,
padded with ``PAD`` (id 0) to the text encoder's ``max_len``, so that a prompt, the null prompt and a
negative prompt all have one shape and :func:`unnoise.guidance.classifier_free` can stack them:
guidance with a negative prompt is classifier-free guidance whose "null" is the negative prompt's ids,
``D_neg + w (D_c - D_neg)``. :class:`TextToImageNet` is the network ``net(x, t, ids)``: the text
encoder's features of ``ids`` (mask ``ids != PAD``) are the U-Net's cross-attention context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.modalities.image.data import to_model, to_uint8
from unnoise.nets.text_encoder import NULL, PAD, TextEncoder, Vocabulary
from unnoise.nets.unet import UNet
from unnoise.nets.vae import AutoencoderKL, reparameterize

__all__ = ["LatentCodec", "TextToImageNet", "null_ids", "prompt_ids"]


def prompt_ids(vocab: Vocabulary, prompts: Sequence[str | bytes | None], max_len: int) -> Tensor:
    """Prompts (None: the null prompt) -> ids long ``(B, max_len)``, padded with ``PAD``; one-line
    ValueError for a prompt that is empty, not UTF-8 or longer than ``max_len`` tokens."""
    ids, _ = vocab.batch(prompts, max_len)
    return F.pad(ids, (0, max_len - ids.shape[1]), value=PAD)


def null_ids(max_len: int) -> Tensor:
    """The null prompt as one row ``(max_len,)``: ``[<null>, <pad>, ...]`` (TrainingData.null of the trainer)."""
    ids = torch.full((max_len,), PAD, dtype=torch.long)
    ids[0] = NULL
    return ids


class TextToImageNet(nn.Module):
    """``net(x, t, ids)``: the U-Net on x ``(B, C, h, w)`` and noise input t ``(B,)``, cross-attending to the
    text encoder's features of ``ids`` ``(B, L)`` (None: the null prompt for every sample) -> x's shape.

    The text encoder is trained jointly with the U-Net (LDM's tau_theta for text-to-image).
    """

    def __init__(self, text_encoder: TextEncoder, unet: UNet):
        super().__init__()
        if unet.config.context_dim != text_encoder.config.width:
            raise ValueError(
                f"the U-Net's context_dim ({unet.config.context_dim}) must equal the text encoder's width "
                f"({text_encoder.config.width})"
            )
        self.text_encoder, self.unet = text_encoder, unet

    def forward(self, x: Tensor, t: Tensor, ids: Tensor | None = None) -> Tensor:
        if ids is None:
            ids = null_ids(1).to(x.device).expand(x.shape[0], 1)
        if ids.ndim != 2 or ids.shape[0] != x.shape[0] or ids.dtype != torch.long:
            raise ValueError(f"prompt ids must be long ({x.shape[0]}, L); got {ids.dtype} {tuple(ids.shape)}")
        length = int((ids != PAD).sum(1).max())  # trailing padding shared by the batch is dropped
        ids = ids[:, : max(length, 1)]
        mask = ids != PAD
        return self.unet(x, t, context=self.text_encoder(ids, mask), context_mask=mask)


class LatentCodec(nn.Module):
    """Pixels <-> scaled VAE latents: ``encode`` uint8 ``(B, C, H, W)`` -> ``(B, z, H/f, W/f)``; ``decode`` back."""

    def __init__(self, vae: AutoencoderKL, scale_factor: float):
        super().__init__()
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0 (1 / std of the latents), got {scale_factor}")
        self.vae, self.scale_factor = vae, float(scale_factor)

    @torch.no_grad()
    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """``scale_factor * z``, z the posterior mean (``sample=False``, as :func:`latent_scale_factor`
        estimates the factor by default) or a draw from q(z | x)."""
        mean, logvar = self.vae.encode(to_model(images))
        z = reparameterize(mean, logvar, generator) if sample else mean
        return self.scale_factor * z

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """uint8 pixels of ``D(latents / scale_factor)``, clamped to 0..255."""
        return to_uint8(self.vae.decode(latents / self.scale_factor).float())
