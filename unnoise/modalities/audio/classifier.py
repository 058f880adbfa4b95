"""The spoken-digit classifier that judges audio samples: its config and network, its training, and its cache.

DiffWave (Kong et al. 2021, sec. 5) scores SC09 samples with a ResNeXt classifier trained on SC09;
this is that classifier scaled down (what it measures is in :mod:`unnoise.modalities.audio.metrics`):

- ``DigitClassifier``: four conv blocks over the per-clip standardised log-mel (plus a mel-band
  coordinate channel), global average pooling to a feature vector, one linear layer to the logits;
- ``train_digit_classifier``: fits one to clips and labels, with augmentation;
- ``digit_classifier``: trained once on the spoken-digits train split, cached as safetensors + JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unnoise.modalities.audio.data import load_wav_folder, split_clips, spoken_digits_folder
from unnoise.modalities.audio.features import (
    apply_log_mel,
    check_front_end,
    check_positive_int,
    check_waves,
    mel_filterbank,
)
from unnoise.training.checkpoint import load_module, read_module_meta, save_module

__all__ = ["DigitClassifier", "DigitClassifierConfig", "digit_classifier", "train_digit_classifier"]

# The recipe digit_classifier trains with; it is part of the cache's sidecar, so changing it retrains.
_RECIPE = {"steps": 400, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-2, "seed": 0}


# ---- the classifier ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitClassifierConfig:
    """The classifier's front end and size; stored as JSON beside cached weights."""

    sample_rate: int = 8000
    n_fft: int = 256  # 32 ms at 8 kHz
    hop: int = 80  # 10 ms at 8 kHz
    n_mels: int = 40
    channels: tuple[int, ...] = (16, 32, 64, 128)  # one conv block each; the last is the feature size D
    num_classes: int = 10

    def __post_init__(self) -> None:
        check_positive_int(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            hop=self.hop,
            n_mels=self.n_mels,
            num_classes=self.num_classes,
        )
        object.__setattr__(self, "channels", tuple(self.channels))  # JSON gives a list back
        if not self.channels or not all(isinstance(c, int) and c >= 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty tuple of positive ints; got {self.channels!r}")

    @classmethod
    def for_rate(cls, sample_rate: int, **kwargs: object) -> DigitClassifierConfig:
        """32 ms windows (the nearest power of two) every 10 ms at ``sample_rate``."""
        n_fft = 2 ** round(math.log2(0.032 * sample_rate))
        return cls(sample_rate=sample_rate, n_fft=n_fft, hop=max(1, round(0.01 * sample_rate)), **kwargs)


class DigitClassifier(nn.Module):
    """Per-clip standardised log-mel and a mel-band coordinate channel
    -> [conv 3x3, GroupNorm, SiLU, max-pool 2x2] x len(channels)
    -> global average pool (the features, ``(N, channels[-1])``) -> linear (the logits, ``(N, num_classes)``).

    GroupNorm rather than BatchNorm: no running statistics, so a clip's features never depend on
    the batch it is scored in, nor on how long training ran before ``eval()``.
    """

    def __init__(self, config: DigitClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or DigitClassifierConfig()
        # Not persistent: recomputed from the config, so the weights file holds only learned tensors.
        self.register_buffer("filters", mel_filterbank(c.n_fft, c.n_mels, c.sample_rate), persistent=False)
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        self.register_buffer("bands", torch.linspace(-1, 1, c.n_mels), persistent=False)
        blocks: list[nn.Module] = []
        for c_in, c_out in zip((2, *c.channels), c.channels, strict=False):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.GroupNorm(math.gcd(8, c_out), c_out),
                nn.SiLU(),
                nn.MaxPool2d(2, ceil_mode=True),  # ceil: a 1-wide axis stays 1 wide, never 0
            ]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c.channels[-1], c.num_classes)

    def front_end(self, waves: Tensor) -> Tensor:
        """``(N, samples)`` -> standardised log-mel ``(N, n_mels, frames)``: zero mean, unit std per clip.

        A gain g adds ``2 log g`` to every log-mel bin (above the 1e-6 floor), so subtracting the
        clip's mean makes the classifier blind to loudness.
        """
        check_waves(waves)
        c = self.config
        check_front_end(waves.shape[-1], c.sample_rate, c.n_fft, c.hop, c.n_mels)
        z = apply_log_mel(waves.to(self.filters), self.filters, self.window, c.hop)
        mu, sd = z.mean(dim=(1, 2), keepdim=True), z.std(dim=(1, 2), keepdim=True)
        return (z - mu) / (sd + 1e-5)

    def features(self, waves: Tensor) -> Tensor:
        """The penultimate activations ``(N, D)``, ``D = channels[-1]``: the space of :func:`feature_distance`."""
        z = self.front_end(waves)[:, None]  # (N, 1, n_mels, frames)
        # Convolutions and average pooling are blind to where a pattern sits, but for speech the
        # frequency of a formant matters: a second channel tells every filter its mel band (CoordConv).
        band = self.bands.to(z)[:, None].expand(len(z), 1, -1, z.shape[-1])  # (N, 1, n_mels, frames)
        h = self.blocks(torch.cat([z, band], dim=1))  # (N, D, n_mels', frames')
        return h.mean(dim=(2, 3))

    def forward(self, waves: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` of waves ``(N, samples)`` at ``config.sample_rate``."""
        return self.head(self.features(waves))


# ---- training ---------------------------------------------------------------------------------------


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, 1, generator=g)


def _augment(x: Tensor, sample_rate: int, g: torch.Generator) -> Tensor:
    """Random versions of clips ``(B, L)``, so a classifier trained on a few TTS voices transfers.

    Per clip: speed 0.9..1.1 (pitch moves with it, as in Kaldi's speed perturbation; linear
    interpolation about the clip's middle), shift +-0.1 s (zeros enter, nothing wraps around), a
    first-order tilt ``y_t - a y_{t-1}`` with a in [-0.5, 0.5] (microphones and vocoders colour
    the spectrum), gain -20..0 dB, and Gaussian noise of std 1e-4..0.02 (the hiss a sampler leaves).
    """
    b, length = x.shape
    speed, shift = _uniform(b, 0.9, 1.1, g), _uniform(b, -0.1, 0.1, g) * sample_rate
    centre = (length - 1) / 2
    pos = centre + (torch.arange(length) - centre) * speed - shift  # (B, L): where each output sample reads
    left = pos.floor().long()
    frac = (pos - left).to(x.dtype)

    def tap(i: Tensor) -> Tensor:
        return torch.where((i >= 0) & (i < length), x.gather(1, i.clamp(0, length - 1)), 0.0)

    y = tap(left) * (1 - frac) + tap(left + 1) * frac
    y = y - _uniform(b, -0.5, 0.5, g) * F.pad(y, (1, 0))[:, :-1]
    gain = 10 ** _uniform(b, -1.0, 0.0, g)
    noise = 10 ** _uniform(b, -4.0, -1.7, g) * torch.randn(b, length, generator=g)
    return (gain * y + noise).to(x.dtype)


def train_digit_classifier(
    waves: Tensor,
    labels: Tensor,
    *,
    config: DigitClassifierConfig | None = None,
    steps: int = _RECIPE["steps"],
    batch_size: int = _RECIPE["batch_size"],
    lr: float = _RECIPE["lr"],
    weight_decay: float = _RECIPE["weight_decay"],
    seed: int = 0,
    progress: bool = False,
) -> DigitClassifier:
    """Fit a :class:`DigitClassifier` to clips ``(N, samples)`` and labels ``(N,)`` in ``0..num_classes-1``.

    Cross-entropy (label smoothing 0.1) with AdamW, the learning rate warmed up linearly over the
    first 5% of ``steps`` then cosine-decayed to 0; each batch is drawn without replacement from a
    reshuffled epoch and augmented (see ``_augment``). Deterministic given ``seed`` (the weights
    are initialised under a forked global RNG; batches and augmentation use a torch.Generator).
    Returns the model in eval mode.
    """
    check_waves(waves)
    config = config or DigitClassifierConfig()
    if not isinstance(labels, Tensor) or labels.dtype != torch.long or labels.shape != waves.shape[:1]:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a long tensor ({len(waves)},) matching waves; got {got}")
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"labels must lie in 0..{config.num_classes - 1} (config.num_classes); got {labels.unique()}")
    check_positive_int(steps=steps, batch_size=batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(config)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    lr_at = lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    waves, batch_size = waves.float(), min(batch_size, len(waves))
    order, at = torch.randperm(len(waves), generator=g), 0
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if at + batch_size > len(order):
            order, at = torch.randperm(len(waves), generator=g), 0
        idx, at = order[at : at + batch_size], at + batch_size
        loss = F.cross_entropy(model(_augment(waves[idx], config.sample_rate, g)), labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        if progress and (step % 50 == 0 or step == steps - 1):
            elapsed = time.perf_counter() - start
            print(f"digit classifier: step {step + 1}/{steps} loss {loss.item():.3f} ({elapsed:.0f} s)")
    return model.eval()


# ---- the cached spoken-digit classifier -----------------------------------------------------------


def _fingerprint(waves: Tensor, labels: Tensor, sample_rate: int, seconds: float) -> dict:
    """What the cached weights were trained on: clip count, rate, length and a SHA-256 of waves + labels."""
    digest = hashlib.sha256(waves.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return {"clips": len(waves), "sample_rate": sample_rate, "seconds": seconds, "sha256": digest.hexdigest()}


def _cached_classifier(
    waves: Tensor, labels: Tensor, seconds: float, config: DigitClassifierConfig, folder: Path, progress: bool = False
) -> DigitClassifier:
    """Load the classifier saved in ``folder`` (:func:`unnoise.training.checkpoint.save_module`) if its meta
    matches this config, recipe and data; else train one and save it there (atomically, so the
    weights and their meta always belong together). A damaged file is retrained over, with a warning."""
    expected = {
        "config": dataclasses.asdict(config),
        "train": _RECIPE,
        "data": _fingerprint(waves, labels, config.sample_rate, seconds),
    }
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as the file holds them
    try:
        found = read_module_meta(folder)
    except (OSError, ValueError):
        found = None
    if isinstance(found, dict) and all(found.get(k) == v for k, v in expected.items()):
        try:
            return load_module(folder, DigitClassifier(config)).eval()
        except (OSError, ValueError) as err:
            warnings.warn(f"retraining the digit classifier: cannot use {folder}: {err}", stacklevel=3)
    start = time.perf_counter()
    model = train_digit_classifier(waves, labels, config=config, **_RECIPE, progress=progress)
    save_module(folder, model, {**expected, "train_seconds": time.perf_counter() - start})
    return model


def digit_classifier(
    sample_rate: int = 8000, seconds: float = 1.0, cache: str | os.PathLike | None = None, *, progress: bool = False
) -> DigitClassifier:
    """The spoken-digit classifier for clips of ``seconds`` at ``sample_rate``, in eval mode.

    Trained once (about half a minute on one CPU thread) on the train split of the synthesised spoken
    digits (``unnoise.modalities.audio.data.spoken_digits_folder``, split by ``split_clips``: 90% of 690
    clips), then cached in ``cache`` (default ``~/.cache/unnoise``) as the folder
    ``digit-classifier-<rate>hz-<seconds>s`` (weights.safetensors and meta.json: the config, the training
    recipe and a fingerprint of the data); a later call loads it, and retrains if any of those differ.
    """
    check_positive_int(sample_rate=sample_rate)
    if not isinstance(seconds, (int, float)) or round(seconds * sample_rate) < 1:
        raise ValueError(f"seconds must be a positive number giving at least one sample; got {seconds!r}")
    clips = load_wav_folder(spoken_digits_folder(), sample_rate=sample_rate, seconds=float(seconds))
    data = split_clips(clips, "train")
    folder = Path(cache) if cache is not None else Path.home() / ".cache" / "unnoise"
    path = folder / f"digit-classifier-{sample_rate}hz-{float(seconds):g}s"
    return _cached_classifier(
        data.waves, data.labels, float(seconds), DigitClassifierConfig.for_rate(sample_rate), path, progress
    )
