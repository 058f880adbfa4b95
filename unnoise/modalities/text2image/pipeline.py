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
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.modalities.image.data import to_model, to_uint8
from unnoise.modalities.run import Run
from unnoise.nets.text_encoder import NULL, PAD, TextEncoder, Vocabulary, check_prompt
from unnoise.nets.unet import UNet
from unnoise.nets.vae import AutoencoderKL, reparameterize
from unnoise.sampling.front import sample as run_sampler
from unnoise.sampling.front import start_sigma

__all__ = [
    "LatentCodec",
    "PixelCodec",
    "TextToImageModel",
    "TextToImageNet",
    "TextToImageRun",
    "null_ids",
    "prompt_ids",
    "read_prompts",
    "sample_text2image",
]


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

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one image's latents ``(z_channels, h, w)``, the space the diffusion runs in."""
        return tuple(self.vae.config.latent_shape)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """uint8 pixels of ``D(latents / scale_factor)``, clamped to 0..255."""
        return to_uint8(self.vae.decode(latents / self.scale_factor).float())


class PixelCodec(nn.Module):
    """The identity codec of a pixel-space run (``extra.space = "pixel"``): uint8 ``(B, C, H, W)`` <->
    model pixels in [-1, 1], so the same U-Net with cross-attention diffuses pixels instead of latents
    (the baseline latent diffusion is measured against, ``benchmarks/text2image.py``)."""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)

    @torch.no_grad()
    def encode(self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        return to_model(images)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        return to_uint8(x.float())


class TextToImageModel(nn.Module):
    """What a text2image run trains and saves: ``net`` (:class:`TextToImageNet`, trained) and ``codec``
    (:class:`LatentCodec`, the VAE frozen: no gradients, so the optimizer and EMA leave it as loaded).

    Keeping the VAE inside the model puts its weights in every checkpoint of the run, so a run samples
    without the VAE run it was trained with (whose path and weights' SHA-256 its config records).
    """

    def __init__(self, net: TextToImageNet, codec: LatentCodec | PixelCodec):
        super().__init__()
        self.net, self.codec = net, codec.requires_grad_(False)

    def forward(self, x: Tensor, t: Tensor, ids: Tensor | None = None) -> Tensor:
        return self.net(x, t, ids)


class TextToImageRun(Run):
    """A text2image run: :class:`unnoise.modalities.run.Run` with its vocabulary, prompt length and codec."""

    @cached_property
    def vocab(self) -> Vocabulary:
        return Vocabulary(tuple(self.extra["vocabulary"]))

    @property
    def max_len(self) -> int:
        return int(self.model.net.text_encoder.config.max_len)

    @property
    def codec(self) -> LatentCodec | PixelCodec:
        return self.model.codec

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The shape the diffusion runs in: the VAE's latents, or the pixels of a pixel-space run."""
        return self.codec.shape


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one per non-blank line (UTF-8); one line naming what is wrong otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file (one prompt per line)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--prompts {path} is not UTF-8 text (byte {err.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompt (one per line)")
    return prompts


def encode_prompts(run: TextToImageRun, prompts: Sequence[str | bytes], what: str = "prompt") -> Tensor:
    """Prompts -> ids ``(B, max_len)``: one line for an empty, non-UTF-8 or too long prompt, or one with
    words the run never saw (they would be read as ``<unk>``)."""
    for i, p in enumerate(prompts):
        where = f"the {what}" if len(prompts) == 1 else f"{what} {i + 1}"
        try:
            text = check_prompt(p)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        unknown = run.vocab.unknown(text)
        if unknown:
            raise ValueError(
                f"{where} {text!r} has words this run never saw: {', '.join(sorted(set(unknown)))} "
                f"(the run knows {len(run.vocab) - 3} words from its training captions)"
            )
    try:
        return prompt_ids(run.vocab, list(prompts), run.max_len)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


@torch.no_grad()
def sample_text2image(
    run: TextToImageRun,
    prompts: Sequence[str],
    *,
    n: int | None = None,
    negative_prompt: str | None = None,
    guidance: float = 1.0,
    sampler: str = "dpmpp_2m",
    nfe: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    **options,
) -> tuple[Tensor, list[str]]:
    """Images uint8 ``(n, C, H, W)`` for ``prompts`` (image i shows prompt ``i % len(prompts)``; ``n``
    defaults to one each) and the prompt of each image.

    The latent U-Net is sampled by ``sampler`` in ``nfe`` evaluations, classifier-free guided with scale
    ``guidance`` against the null prompt, or against ``negative_prompt`` (its ids take the null's place:
    ``D_neg + w (D_c - D_neg)``), then decoded by the run's VAE. Per-sample seeds (seed + i) make image
    i independent of n and of the batching.
    """
    if not len(prompts):
        raise ValueError("no prompt: give --prompt TEXT or --prompts FILE")
    if negative_prompt is not None and guidance == 1.0:
        raise ValueError("--negative-prompt steers classifier-free guidance: give --guidance other than 1 (e.g. 4)")
    n = len(prompts) if n is None else n
    ids = encode_prompts(run, prompts)
    null = null_ids(run.max_len) if negative_prompt is None else encode_prompts(run, [negative_prompt], "negative")[0]
    shape = run.latent_shape
    top = start_sigma(sampler, nfe, run.sigma_max, run.sigma_min, options.get("grid"), run.schedule)
    images = []
    for start in range(0, n, batch_size):
        index = range(start, min(n, start + batch_size))
        generators = [torch.Generator().manual_seed(seed + i) for i in index]
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]) * top
        cond = ids[torch.tensor(list(index)) % len(prompts)]
        D = run.denoiser(cond, null, guidance)
        z = run_sampler(
            D, x, sampler=sampler, nfe=nfe, sigma_max=run.sigma_max, sigma_min=run.sigma_min,
            generator=generators, schedule=run.schedule, **options,
        )  # fmt: skip
        images.append(run.codec.decode(z))
    return torch.cat(images), [str(prompts[i % len(prompts)]) for i in range(n)]
