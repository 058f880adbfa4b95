"""The text2image modality: latent diffusion on a VAE's latents, conditioned on prompts (issue 17).

A text2image run needs a VAE run (``unnoise train vae``, :mod:`.vae_run`), named by ``--vae RUN``
(``extra.vae``). Training encodes the captioned images once into scaled latents
(:class:`.pipeline.LatentCodec`), builds a word vocabulary from the captions, and trains a U-Net with
cross-attention to a jointly trained text encoder (:class:`.pipeline.TextToImageNet`), dropping the
prompt to the null prompt with probability ``p_uncond`` for classifier-free guidance. The VAE's
weights ride inside the model (:class:`.pipeline.TextToImageModel`), so every checkpoint is
self-contained; the config records the VAE run's path, its EMA weights' SHA-256, its architecture
and the latent scale factor. Sampling (:func:`.pipeline.sample_text2image`) takes prompts, a negative
prompt and guidance; writers: :mod:`.io`; metrics (prompt following, generated vs real scenes):
:mod:`.metrics` via :func:`evaluate_text2image`; demo: :mod:`.demo`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unnoise.modalities.base import TrainingData, output_stem
from unnoise.modalities.text2image.io import save_grid, save_prompt_npz
from unnoise.modalities.text2image.pipeline import (
    LatentCodec,
    PixelCodec,
    TextToImageModel,
    TextToImageNet,
    TextToImageRun,
    null_ids,
    prompt_ids,
    read_prompts,
    sample_text2image,
)
from unnoise.modalities.text2image.vae_run import captioned_data, load_vae_run
from unnoise.nets.text_encoder import TextEncoder, TextEncoderConfig, Vocabulary
from unnoise.nets.unet import UNet, UNetConfig
from unnoise.nets.vae import AutoencoderKL, VAEConfig
from unnoise.schema import from_dict
from unnoise.training.config import TrainConfig
from unnoise.training.objectives import Encoded

SCENES = 20_000  # fashion-scenes drawn for training (extra.scenes)
SPACES = ("latent", "pixel")  # extra.space: where the diffusion runs (pixel: the baseline of latent diffusion)


def channel_mults(size: int) -> tuple[int, ...]:
    """Levels halving ``size`` until the feature map is at most 8 wide: 14x14 latents -> (1, 2), down to
    7x7; 56x56 pixels -> (1, 2, 2, 2), also down to 7x7, where (cross-)attention sits either way."""
    mults = [1]
    while size // 2 ** (len(mults) - 1) > 8 and size % 2 ** len(mults) == 0:
        mults.append(2)
    return tuple(mults)


def network_configs(preset: str, shape: tuple[int, ...], vocab_size: int, extra: dict) -> tuple:
    """The text encoder's and the U-Net's configs for ``preset`` ("tiny" for tests, "small") on
    ``shape`` (latents, or pixels), with ``extra["text_encoder"]`` and ``extra["unet"]`` overrides on top."""
    z, size = shape[0], shape[-1]
    mults = channel_mults(size)
    if preset == "tiny":
        text = dict(width=32, depth=1, heads=2, positions="rotary")
        unet = dict(base_channels=16, channel_mults=mults, num_res_blocks=1, num_heads=2, dropout=0.0)
    elif preset == "small":
        # 1.3M parameters on latents; measured on 14x14x4 latents, one thread: 0.41 s per training step
        # of 64 and 2.1 ms per image per network call. Attention (and so cross-attention) at 14x14 too,
        # or base 64, cost 1.6x and 6x that per step (what quality each buys is not measured yet).
        text = dict(width=64, depth=2, heads=4, positions="rotary")
        unet = dict(base_channels=32, channel_mults=mults, num_res_blocks=2, num_heads=4, dropout=0.0)
    else:
        raise ValueError(f"unknown text2image model {preset!r}; allowed: tiny, small")
    unet["attention_resolutions"] = (size // 2 ** (len(mults) - 1),)
    # rotary positions in the text encoder (TextEncoderConfig's default, "learned", stays for the runs
    # saved before): benchmarks/text2image_levers.py found them the one lever that binds objects to
    # their cells (whole scene 0.310 against 0.260 learned; on 500 fresh prompts at guidance 8, 0.376
    # against 0.308, 52 prompts right only with rotary, 18 only without).
    # No query positions (UNetConfig.context_positions stays 0): benchmarks/text2image_levers.py found
    # they did not help objects find their cells (whole scene 0.237 against 0.260 without, s.e. 0.025)
    text_cfg = TextEncoderConfig(vocab_size, **(text | dict(extra.get("text_encoder", {}))))
    unet_cfg = UNetConfig(size, z, **({"context_dim": text_cfg.width} | unet | dict(extra.get("unet", {}))))
    if unet_cfg.context_dim != text_cfg.width:
        raise ValueError(f"extra.unet.context_dim must equal the text encoder's width {text_cfg.width}")
    return text_cfg, unet_cfg


def _model(extra: dict[str, Any], where: str) -> TextToImageModel:
    text_cfg = from_dict(TextEncoderConfig, extra["text_encoder_config"], f"{where} 'extra.text_encoder_config'")
    unet_cfg = from_dict(UNetConfig, extra["unet_config"], f"{where} 'extra.unet_config'")
    net = TextToImageNet(TextEncoder(text_cfg), UNet(unet_cfg))
    if extra.get("space") == "pixel":
        return TextToImageModel(net, PixelCodec((unet_cfg.in_channels, unet_cfg.image_size, unet_cfg.image_size)))
    vae = AutoencoderKL(from_dict(VAEConfig, extra["vae_config"], f"{where} 'extra.vae_config'"))
    return TextToImageModel(net, LatentCodec(vae, float(extra["latent_scale_factor"])))


class TextToImageModality:
    """Text to image: see the module docstring."""

    name = "text2image"
    defaults: dict[str, Any] = {"data": "fashion-scenes", "model": "small", "batch_size": 64, "lr": 1e-3}
    # Stable Diffusion's process (LDM's "scaled_linear" betas, sigma_max 14.6): latents are unbounded, so
    # sampling cannot clamp x0 as pixel runs do, and the cosine schedule's sigma_max of 2e4 times an
    # eps-network's error left the samples at noise scale (latent std ~2e3 after 400 steps of the demo)
    ddpm_defaults: dict[str, Any] = {"schedule": "scaled_linear", "T": 1000, "prediction": "eps"}
    default_sampler = "dpmpp_2m"
    sample_options = ("prompt", "prompts", "negative_prompt", "guidance", "eta", "grid")
    eval_options = ("n", "guidance", "grid")
    sharded = False
    run_type = TextToImageRun

    def check(self, cfg: TrainConfig) -> None:
        space = cfg.extra.get("space", "latent")
        if space not in SPACES:
            raise ValueError(f"extra.space must be one of {', '.join(SPACES)}, got {space!r}")
        if space == "pixel" and cfg.extra.get("vae"):
            raise ValueError("a pixel-space run (extra.space = 'pixel') diffuses pixels: it takes no --vae")
        if space == "latent" and not cfg.extra.get("vae"):
            raise ValueError(
                "text2image runs diffuse in a VAE's latents: give --vae RUN (made by unnoise train vae), "
                "or set extra.space = 'pixel' to diffuse pixels"
            )
        if space == "latent" and cfg.image_size is not None:
            raise ValueError("--image-size: a text2image run takes the image size of its VAE run")
        if not cfg.conditional:
            raise ValueError("text2image runs are conditioned on prompts; --unconditional does not apply")
        scenes = cfg.extra.get("scenes", SCENES)
        if not isinstance(scenes, int) or scenes < 1:
            raise ValueError(f"extra.scenes must be a positive number of training scenes, got {scenes!r}")

    def training_data(self, cfg: TrainConfig) -> TrainingData:
        if cfg.extra.get("space") == "pixel":
            data = captioned_data(
                cfg.data, "train", n=cfg.extra.get("scenes", SCENES), size=cfg.image_size,
                channels=int(cfg.extra.get("channels", 1)),
            )  # fmt: skip
            return self._prompted(cfg, data, torch.cat([PixelCodec(()).encode(b) for b in data.images.split(256)]))
        vae_run = load_vae_run(cfg.extra["vae"])
        vcfg = vae_run.vae.config
        data = captioned_data(
            cfg.data, "train", n=cfg.extra.get("scenes", SCENES), size=vcfg.image_size, channels=vcfg.in_channels
        )
        if tuple(data.images.shape[1:]) != (vcfg.in_channels, vcfg.image_size, vcfg.image_size):
            raise ValueError(
                f"--data {cfg.data} gives images {tuple(data.images.shape[1:])}; the VAE of {vae_run.path} takes "
                f"{(vcfg.in_channels, vcfg.image_size, vcfg.image_size)}"
            )
        codec = LatentCodec(vae_run.vae, vae_run.scale_factor)
        latents = torch.cat([codec.encode(b) for b in data.images.split(256)])
        cfg.extra |= {
            "vae_run": str(Path(vae_run.path).resolve()),
            "vae_sha256": vae_run.sha256,
            "vae_config": dataclasses.asdict(vcfg),
            "latent_scale_factor": vae_run.scale_factor,
        }
        return self._prompted(cfg, data, latents)

    def _prompted(self, cfg: TrainConfig, data, x: Tensor) -> TrainingData:
        """The training pairs: ``x`` (latents or pixels) with the prompt ids of the captions' vocabulary."""
        vocab = Vocabulary.build(data.captions)
        max_len = int(cfg.extra.get("text_encoder", {}).get("max_len", TextEncoderConfig.max_len))
        longest = max(len(vocab.tokenize(c)) for c in data.captions)
        if longest > max_len:
            raise ValueError(f"a caption of {cfg.data} is {longest} tokens; the text encoder takes {max_len}")
        cfg.extra |= {"space": cfg.extra.get("space", "latent"), "vocabulary": list(vocab.words), "scenes": len(data)}
        return TrainingData(x, prompt_ids(vocab, data.captions, max_len), null_ids(max_len))

    def build(self, cfg: TrainConfig, data: TrainingData) -> TextToImageModel:
        extra = cfg.extra
        text_cfg, unet_cfg = network_configs(cfg.model, tuple(data.x.shape[1:]), len(extra["vocabulary"]), extra)
        extra["text_encoder_config"] = dataclasses.asdict(text_cfg)
        extra["unet_config"] = dataclasses.asdict(unet_cfg)
        model = _model(extra, "settings")
        if extra["space"] == "latent":
            model.codec.vae.load_state_dict(load_vae_run(extra["vae"]).vae.state_dict())
            model.codec.requires_grad_(False)
        return model

    def load(self, config: dict[str, Any], cfg: TrainConfig) -> TextToImageModel:
        return _model(cfg.extra, "config.json")

    def network(self, model: TextToImageModel):
        return model.net

    def encode(self, model: TextToImageModel, x: Tensor) -> Encoded:
        return Encoded(x, model.net)

    def preview(self, run_dir: Path, cfg: TrainConfig, model: TextToImageModel, step: int) -> None:
        pass

    def sample(
        self,
        run: TextToImageRun,
        *,
        prompt: str | None = None,
        prompts: Path | None = None,
        n: int | None = None,
        **options,
    ) -> dict[str, Any]:
        if prompt is not None and prompts is not None:
            raise ValueError("give --prompt TEXT or --prompts FILE, not both")
        if prompt is None and prompts is None:
            raise ValueError("text2image sampling needs --prompt TEXT or --prompts FILE (one prompt per line)")
        texts = [prompt] if prompt is not None else read_prompts(prompts)
        images, used = sample_text2image(run, texts, n=n, **options)
        return {"images": images, "prompts": used, "distinct": len(texts)}

    def sample_shape(self, run: TextToImageRun) -> tuple[int, ...]:
        return run.latent_shape

    def outputs(self, out: Path) -> list[Path]:
        stem = output_stem(out, (".png", ".npz"))
        return [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npz")]

    def write(self, run: TextToImageRun, samples: dict[str, Any], out: Path, **options) -> list[Path]:
        images, prompts, k = samples["images"], samples["prompts"], samples["distinct"]
        png, npz = self.outputs(out)
        nrow = k if 1 < k <= 16 else math.ceil(math.sqrt(len(images)))  # with several prompts: one per column
        return [save_grid(png, images, nrow=nrow), save_prompt_npz(npz, images, prompts)]

    def evaluate(self, run: TextToImageRun, **options) -> list[str]:
        return evaluate_text2image(run, **options)

    def demo(self, out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
        from unnoise.modalities.text2image.demo import run_text2image_demo

        return run_text2image_demo(out, steps=steps, seed=seed)


def evaluate_text2image(
    run: TextToImageRun, *, n: int | None = None, guidance: float = 1.0, seed: int = 0, **sampling
) -> list[str]:
    """`unnoise eval` on a text2image run: prompt-following accuracy (whole scene right, by number of
    objects) of ``n`` images (default 200) drawn for the captions of test-split fashion-scenes, beside
    the same score of real scenes laid out per the same prompts from test-split items."""
    from unnoise.modalities.text2image.data import fashion_scenes, real_scenes
    from unnoise.modalities.text2image.metrics import cell_classifier, predict_cells, prompt_following

    if run.cfg.data != "fashion-scenes":
        raise ValueError(f"prompt following is scored on fashion-scenes prompts; this run trained on {run.cfg.data}")
    n = n or 200
    test = fashion_scenes(n, "test", seed=seed)
    classifier = cell_classifier()
    start = time.perf_counter()
    images, _ = sample_text2image(run, test.captions, n=n, guidance=guidance, seed=seed, **sampling)
    seconds = (time.perf_counter() - start) / n
    generated = prompt_following(predict_cells(classifier, images), test.scenes)
    real = prompt_following(predict_cells(classifier, real_scenes(test.scenes, seed=seed)), test.scenes)
    how = f"{n} test prompts, {sampling['sampler']}, {sampling['nfe']} NFE, guidance {guidance:g}"
    how += f", grid {sampling['grid']}" if sampling.get("grid") else ""
    ratios = ", ".join(
        f"{g} objects: {generated.by_objects[g] / r:.2f}" if r > 0 else f"{g} objects: n/a"
        for g, r in real.by_objects.items()
    )
    return [
        f"prompt following ({how}):",
        *("  " + line for line in generated.lines("generated")),
        *("  " + line for line in real.lines("real scenes, same prompts")),
        f"  generated / real: {ratios}",
        f"sampling: {seconds:.3f} s per image (VAE decoding included, {torch.get_num_threads()} threads)",
    ]


MODALITY = TextToImageModality()
