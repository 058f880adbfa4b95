"""The audio modality: waveform diffusion on spoken digits (or any folder of WAVs), class-conditional.

Data: :mod:`.data` (spoken digits synthesised once, folders of WAVs); networks: the 1-D U-Net or
DiffWave (:mod:`.pipeline`); writers (WAV, spectrogram grid): :mod:`.io`; metrics (digit accuracy,
Frechet distance, real-time factor): :mod:`.metrics` via :func:`.pipeline.evaluate_audio`; demo:
:mod:`.demo`. Training, loading and the run's denoiser are the generic ones of
:mod:`unnoise.modalities.run`.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unnoise.modalities.audio.demo import run_audio_demo
from unnoise.modalities.audio.io import save_spectrogram_grid, save_wav
from unnoise.modalities.audio.pipeline import (
    AudioRun,
    _load_net,
    audio_dataset,
    audio_net,
    evaluate_audio,
    sample_audio,
)
from unnoise.modalities.base import TrainingData, output_stem
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import current
from unnoise.training.objectives import Encoded


class AudioModality:
    """Audio: see the module docstring."""

    name = "audio"
    # the recipe of benchmarks/audio.py: DiffWave's process (sigma up to 1.6) with 200 steps
    defaults: dict[str, Any] = {"data": "spoken-digits", "model": "small", "ema_decay": 0.995}
    ddpm_defaults: dict[str, Any] = {"schedule": "diffwave", "T": 200}
    default_sampler = "unipc"
    sample_options = ("class_id", "guidance", "grid", "eta")
    eval_options = ("n", "guidance", "grid")
    sharded = False  # sample/eval dealt to the processes of a torchrun group
    run_type = AudioRun

    def check(self, cfg: TrainConfig) -> None:
        if cfg.learned_variance and cfg.extra.get("arch", "unet") == "diffwave":
            raise ValueError(
                f"loss {cfg.loss!r} learns the reverse variance, which needs the U-Net's second output channel; "
                "--arch diffwave has one (use --arch unet, or loss simple | min_snr)"
            )
        if cfg.image_size is not None:
            raise ValueError("--image-size applies to image runs")

    def training_data(self, cfg: TrainConfig) -> TrainingData:
        data = audio_dataset(cfg, "train")
        conditional = cfg.conditional and bool(data.class_names)
        cfg.extra |= {"class_names": list(data.class_names), "sample_rate": data.sample_rate}
        x0 = data.waves[:, None, :]  # (N, 1, samples)
        if not conditional:
            return TrainingData(x0)
        return TrainingData(x0, data.labels, torch.tensor(len(data.class_names)))

    def build(self, cfg: TrainConfig, data: TrainingData) -> nn.Module:
        return audio_net(cfg, data.x.shape[-1], None if data.null is None else int(data.null))

    def load(self, config: dict[str, Any], cfg: TrainConfig) -> nn.Module:
        return _load_net(cfg)

    def network(self, model: nn.Module):
        return model

    def encode(self, model: nn.Module, x: Tensor) -> Encoded:
        return Encoded(x, model)

    def preview(self, run_dir: Path, cfg: TrainConfig, model: nn.Module, step: int) -> None:
        pass

    def sample(self, run: AudioRun, **options) -> tuple[Tensor, Tensor]:
        return sample_audio(run, **options)

    def sample_shape(self, run: AudioRun) -> tuple[int, ...]:
        return (1, run.samples)

    def outputs(self, out: Path) -> list[Path]:
        stem = output_stem(out, (".png", ".wav"))
        clips = stem.parent.glob(glob.escape(stem.name) + "_[0-9][0-9][0-9]_class*.wav")
        return [stem.with_name(stem.name + ".png"), *sorted(clips)]

    def write(self, run: AudioRun, samples: tuple[Tensor, Tensor], out: Path, **options) -> list[Path]:
        if not current().main:
            return []
        waves, labels = samples
        out = output_stem(out, (".png", ".wav"))
        written = [
            save_wav(out.with_name(f"{out.name}_{i:03d}_class{label}.wav"), wave, run.sample_rate)
            for i, (wave, label) in enumerate(zip(waves, labels.tolist(), strict=True))
        ]
        return [*written, save_spectrogram_grid(out.with_name(out.name + ".png"), waves, run.sample_rate)]

    def evaluate(self, run: AudioRun, *, n: int | None = None, **sampling) -> list[str]:
        n = n or 100
        scores = evaluate_audio(run, n=n, **sampling)
        how = f"{n} clips, {sampling['sampler']}, {sampling['nfe']} NFE, guidance {sampling.get('guidance', 1.0):g}"
        how += f", grid {sampling['grid']}" if sampling.get("grid") else ""
        lines = []
        if "accuracy" in scores:
            lines.append(f"digit accuracy of class-conditional samples: {scores['accuracy']:.1%} ({how})")
        lines.append(f"Frechet distance to held-out real clips (classifier features): {scores['fd']:.2f}")
        lines.append(f"real-time factor of generation: {scores['rtf']:.3f} (below 1: faster than real time)")
        return lines

    def demo(self, out: Path, *, steps: int | None = None, seed: int = 0) -> dict[str, float]:
        return run_audio_demo(out, steps=steps, seed=seed)


MODALITY = AudioModality()
