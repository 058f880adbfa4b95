"""Audio generation from a run, and the run's clips and network (a 1-D U-Net or DiffWave).

The network is ``cfg.extra["arch"]``: "unet" (the default: the ADM U-Net of unnoise.nets.unet over the
waveform, ``dims=1``, downsampling by 4 per level, so most of its compute runs at 1/16 to 1/64 of the
rate and attention spans the clip) or "diffwave" (unnoise.nets.wavenet: every layer at the full rate).
On spoken digits at equal CPU the U-Net learns far faster (benchmarks/audio.py, README). Clips are
peak-normalised waveforms in [-1, 1]; samples leave as such, (N, samples).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from unnoise.denoisers import clipped
from unnoise.modalities.audio.data import AudioDataset, load_wav_folder, split_clips, spoken_digits_folder
from unnoise.modalities.run import Run, load_run
from unnoise.nets.unet import UNet, UNetConfig
from unnoise.nets.wavenet import DiffWave, WaveNetConfig
from unnoise.sampling.front import sample as run_sampler
from unnoise.sampling.front import start_sigma
from unnoise.schema import from_dict
from unnoise.training.config import TrainConfig


def audio_dataset(cfg: TrainConfig, split: str = "train") -> AudioDataset:
    """The run's clips: "spoken-digits" (synthesised once into ``cfg.extra["cache"]``) or a folder,
    split 90/10 by a fixed permutation (:func:`unnoise.modalities.audio.data.split_clips`)."""
    rate, seconds = int(cfg.extra.get("sample_rate", 8000)), float(cfg.extra.get("seconds", 1.0))
    if cfg.data == "spoken-digits":
        folder = spoken_digits_folder(cfg.extra.get("cache"))
    elif Path(cfg.data).is_dir():
        folder = Path(cfg.data)
    else:
        raise ValueError(f"unknown audio data {cfg.data!r}; allowed: spoken-digits, or a folder of WAV files")
    return split_clips(load_wav_folder(folder, sample_rate=rate, seconds=seconds), split)


ARCHS: tuple[str, ...] = ("diffwave", "unet")

# Waveform U-Net sizes: "tiny" for tests, "small" for a CPU (7.3M parameters, about as fast per
# step as the 32-channel, 22-layer DiffWave of benchmarks/audio.py, 0.45M).
UNET_PRESETS = {
    "tiny": dict(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=1, num_heads=2, dropout=0.0),
    "small": dict(base_channels=32, channel_mults=(1, 2, 4, 8), num_res_blocks=2, num_heads=4, dropout=0.0),
}


def audio_net(cfg: TrainConfig, samples: int, num_classes: int | None) -> nn.Module:
    """The run's network from ``cfg.extra["arch"]``, ``cfg.model`` (a preset) and ``cfg.extra["net"]``
    (settings over the preset); records the full config in ``cfg.extra["wavenet"]`` or ``["unet"]``."""
    arch, over = cfg.extra.setdefault("arch", "unet"), cfg.extra.get("net", {})
    if arch == "diffwave":
        config = dataclasses.replace(WaveNetConfig.preset(cfg.model, num_classes), **over)
        cfg.extra["wavenet"] = dataclasses.asdict(config)
        return DiffWave(config)
    if arch != "unet":
        raise ValueError(f"unknown audio network {arch!r}; allowed: {', '.join(ARCHS)}")
    if cfg.model not in UNET_PRESETS:
        raise ValueError(f"unknown waveform U-Net preset {cfg.model!r}; allowed: {', '.join(UNET_PRESETS)}")
    size = dict(dims=1, factor=4) | UNET_PRESETS[cfg.model] | over
    lowest = samples // size["factor"] ** (len(size["channel_mults"]) - 1)
    # attention at the lowest level only: a few hundred positions that together span the clip
    kw = dict(attention_resolutions=(lowest,)) | size
    kw["learned_variance"] = cfg.learned_variance
    config = UNetConfig(image_size=samples, in_channels=1, num_classes=num_classes, **kw)
    cfg.extra["unet"] = dataclasses.asdict(config)
    return UNet(config)


def _load_net(cfg: TrainConfig) -> nn.Module:
    if "unet" in cfg.extra:
        return UNet(from_dict(UNetConfig, cfg.extra["unet"], "config.json 'extra.unet'"))
    return DiffWave(from_dict(WaveNetConfig, cfg.extra["wavenet"], "config.json 'extra.wavenet'"))


class AudioRun(Run):
    """An audio run with its sample rate and clip length."""

    @property
    def net(self) -> nn.Module:
        return self.model

    @property
    def sample_rate(self) -> int:
        return int(self.cfg.extra["sample_rate"])

    @property
    def samples(self) -> int:
        return int(self.sample_rate * float(self.cfg.extra.get("seconds", 1.0)))


def load_audio_run(run_dir: str | Path) -> AudioRun:
    return load_run(run_dir, expect="audio")


@torch.no_grad()
def sample_audio(
    run: AudioRun,
    *,
    n: int = 10,
    sampler: str = "unipc",
    nfe: int = 20,
    guidance: float = 1.0,
    class_id: int | None = None,
    seed: int = 0,
    grid: str | None = None,
    bf16: bool | None = None,
    **options,
) -> tuple[Tensor, Tensor]:
    """``n`` clips (N, samples) in [-1, 1] and their labels; conditional runs cycle the classes.

    ``grid="diffwave"`` with ``sampler="ddpm", nfe=6`` is DiffWave's fast sampler (its 6-step
    inference schedule); the chain starts at that grid's top noise level. ``bf16`` runs the network
    under bfloat16 autocast (None: as it was trained, where the machine runs bf16 natively).
    ``options`` (eta) go to the sampler.
    """
    k = run.model.config.num_classes
    if class_id is not None and (k is None or not 0 <= class_id < k):
        allowed = "none: this model is unconditional" if k is None else f"0..{k - 1}"
        raise ValueError(f"unknown class {class_id}; allowed: {allowed}")
    if guidance != 1.0 and k is None:
        raise ValueError("this model is unconditional: guidance needs a class-conditional run (leave it at 1)")
    labels = torch.full((n,), class_id) if class_id is not None else torch.arange(n) % (k or 1)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    s_max, s_min = run.sigma_max, run.sigma_min
    top = start_sigma(sampler, nfe, s_max, s_min, grid, run.schedule)
    x = torch.stack([torch.randn(1, run.samples, generator=g) for g in generators]) * top
    null = None if k is None else torch.tensor(k)
    D = clipped(run.denoiser(None if k is None else labels, null, guidance, bf16=bf16))
    out = run_sampler(
        D, x, sampler=sampler, nfe=nfe, sigma_max=s_max, sigma_min=s_min, grid=grid, schedule=run.schedule,
        generator=generators, **options,
    )  # fmt: skip
    return out[:, 0].clamp(-1, 1), labels if k is not None else torch.full((n,), -1)


def evaluate_audio(
    run: AudioRun,
    *,
    n: int = 100,
    sampler: str = "unipc",
    nfe: int = 20,
    guidance: float = 1.0,
    grid: str | None = None,
    seed: int = 0,
    classifier=None,
    bf16: bool | None = None,
) -> dict[str, float]:
    """DiffWave's SC09 evaluation, scaled down: ``n`` generated clips judged by the spoken-digit
    classifier of :mod:`unnoise.modalities.audio.metrics`.

    Returns ``accuracy`` (conditional runs: the classifier's agreement with the requested digit),
    ``fd`` (Frechet distance between classifier features of the generated and the held-out real
    clips) and ``rtf`` (wall-clock seconds of generation per second of audio, on this machine).
    """
    from unnoise.modalities.audio import classifier as audio_classifier
    from unnoise.modalities.audio import metrics as audio_metrics

    names = run.cfg.extra.get("class_names") or []
    if names and names != [str(d) for d in range(10)]:
        raise ValueError(f"the digit classifier judges spoken-digits runs (classes 0..9); this run's classes: {names}")
    clip_seconds = run.samples / run.sample_rate
    start = time.perf_counter()
    sampling = dict(sampler=sampler, nfe=nfe, guidance=guidance, seed=seed, grid=grid, bf16=bf16)
    waves, labels = sample_audio(run, n=n, **sampling)
    seconds = time.perf_counter() - start
    judge = classifier or audio_classifier.digit_classifier(run.sample_rate, clip_seconds)
    real = audio_dataset(run.cfg, "test")
    scores = {
        "rtf": audio_metrics.real_time_factor(seconds, n, clip_seconds),
        "fd": audio_metrics.feature_distance(judge, waves, real.waves),
    }
    if run.model.config.num_classes is not None:
        scores["accuracy"] = audio_metrics.accuracy(judge, waves, labels)
    return scores
