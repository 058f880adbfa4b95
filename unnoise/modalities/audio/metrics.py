"""Audio sample quality: a small spoken-digit classifier on log-mel features, and what it measures.

DiffWave (Kong et al. 2021, sec. 5) scores SC09 samples with a ResNeXt classifier trained on SC09: the
accuracy of class-conditional samples, and a Frechet distance between Gaussian fits of generated
and real clips in the classifier's feature space (their "FID"). This is that recipe scaled down:

- ``log_mel``: the front end, ``log(M |STFT|^2 + 1e-6)`` with HTK-mel triangular filters ``M``;
- ``DigitClassifier``: four conv blocks over the per-clip standardised log-mel (plus a mel-band
  coordinate channel), global average pooling to a feature vector, one linear layer to the logits;
- ``digit_classifier``: trained once on the spoken-digits train split, cached as safetensors + JSON;
- ``accuracy``, ``feature_distance`` and ``real_time_factor`` (compute time / audio time).

Clips are float waveforms ``(N, samples)`` in [-1, 1] at the classifier's sample rate (8 kHz, 1 s
by default); nothing here resamples, so pass clips at ``classifier.config.sample_rate``.
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

from unnoise.metrics import frechet_distance, gaussian_fit
from unnoise.training.checkpoint import load_module, read_module_meta, save_module

__all__ = [
    "DigitClassifier",
    "DigitClassifierConfig",
    "accuracy",
    "digit_classifier",
    "feature_distance",
    "log_mel",
    "mel_filterbank",
    "real_time_factor",
    "train_digit_classifier",
]

# The recipe digit_classifier trains with; it is part of the cache's sidecar, so changing it retrains.
_RECIPE = {"steps": 400, "batch_size": 32, "lr": 3e-3, "weight_decay": 1e-2, "seed": 0}


def _check_waves(waves: object, what: str = "waves") -> None:
    if not isinstance(waves, Tensor) or not waves.is_floating_point() or waves.ndim != 2 or 0 in waves.shape:
        got = f"{waves.dtype} {tuple(waves.shape)}" if isinstance(waves, Tensor) else type(waves).__name__
        raise ValueError(f"{what} must be a non-empty float tensor (N, samples) in [-1, 1]; got {got}")


def _check_positive_int(**values: object) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}")


def _hz_to_mel(f: Tensor | float) -> Tensor | float:
    """HTK mel scale: ``m = 2595 log10(1 + f / 700)``."""
    return 2595.0 * (torch.log10(1 + f / 700) if isinstance(f, Tensor) else math.log10(1 + f / 700))


def _mel_to_hz(m: Tensor) -> Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1)


# ---- front end ------------------------------------------------------------------------------------


def mel_filterbank(
    n_fft: int,
    n_mels: int,
    sample_rate: int,
    f_min: float = 0.0,
    f_max: float | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triangular filters on the HTK mel scale (Young et al., The HTK Book, sec. 5.4): ``(n_mels, n_fft // 2 + 1)``.

    Edges ``f_0 < ... < f_{n_mels+1}`` are equally spaced in ``m = 2595 log10(1 + f / 700)`` from
    ``f_min`` to ``f_max`` (default: Nyquist). Filter ``j`` (``1 <= j <= n_mels``, row ``j - 1``) at the
    FFT bin frequency ``f_k = k sample_rate / n_fft`` is ``max(0, min((f_k - f_{j-1}) / (f_j - f_{j-1}),
    (f_{j+1} - f_k) / (f_{j+1} - f_j)))``: linear in Hz, **unit peak** (1 at its centre ``f_j``, not
    area-normalised as in Slaney's variant). Neighbours cross at 1/2 and sum to 1 between ``f_1`` and
    ``f_{n_mels}``. A narrow filter whose centre falls between bins peaks below 1 on the bin grid.
    """
    _check_positive_int(n_fft=n_fft, n_mels=n_mels, sample_rate=sample_rate)
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2}; got {f_min}, {f_max}")
    mels = torch.linspace(_hz_to_mel(float(f_min)), _hz_to_mel(float(f_max)), n_mels + 2, dtype=torch.float64)
    edges = _mel_to_hz(mels)  # (n_mels + 2,) Hz
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft  # (F,)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (n_mels, 1) each
    rise = (freqs - lower) / (centre - lower)
    fall = (upper - freqs) / (upper - centre)
    return torch.minimum(rise, fall).clamp_min(0).to(dtype)


def _log_mel(waves: Tensor, filters: Tensor, window: Tensor, hop: int) -> Tensor:
    """``log(filters @ |STFT|^2 + 1e-6)``: ``(N, samples)`` -> ``(N, n_mels, 1 + samples // hop)``."""
    n_fft = len(window)
    spec = torch.stft(waves, n_fft, hop, window=window, center=True, return_complex=True)  # (N, F, T)
    power = spec.real**2 + spec.imag**2
    return torch.log(filters @ power + 1e-6)  # (n_mels, F) @ (N, F, T) -> (N, n_mels, T)


def _check_front_end(samples: int, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> None:
    _check_positive_int(sample_rate=sample_rate, n_fft=n_fft, hop=hop, n_mels=n_mels)
    if samples <= n_fft // 2:  # center=True reflect-pads n_fft // 2 samples each side
        raise ValueError(f"clips must be longer than n_fft // 2 = {n_fft // 2} samples; got {samples}")


def log_mel(waves: Tensor, sample_rate: int, n_fft: int = 256, hop: int = 80, n_mels: int = 40) -> Tensor:
    """Log-mel spectrogram: ``(N, samples)`` -> ``(N, n_mels, 1 + samples // hop)``.

    ``S = log(M |X|^2 + 1e-6)`` with ``X`` the STFT (Hann window of ``n_fft`` samples, hop ``hop``,
    ``center=True`` with reflection padding, no normalisation: a full-scale sine of amplitude A
    gives ``|X| ~ A n_fft / 4`` at its bin) and ``M`` = :func:`mel_filterbank` (``f_min`` 0, ``f_max``
    Nyquist). The defaults are 32 ms windows every 10 ms at 8 kHz. Computed in the waves' dtype.
    """
    _check_waves(waves)
    _check_front_end(waves.shape[-1], sample_rate, n_fft, hop, n_mels)
    filters = mel_filterbank(n_fft, n_mels, sample_rate, dtype=waves.dtype).to(waves.device)
    return _log_mel(waves, filters, torch.hann_window(n_fft, dtype=waves.dtype, device=waves.device), hop)


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
        _check_positive_int(
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
        _check_waves(waves)
        c = self.config
        _check_front_end(waves.shape[-1], c.sample_rate, c.n_fft, c.hop, c.n_mels)
        z = _log_mel(waves.to(self.filters), self.filters, self.window, c.hop)
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
    _check_waves(waves)
    config = config or DigitClassifierConfig()
    if not isinstance(labels, Tensor) or labels.dtype != torch.long or labels.shape != waves.shape[:1]:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a long tensor ({len(waves)},) matching waves; got {got}")
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"labels must lie in 0..{config.num_classes - 1} (config.num_classes); got {labels.unique()}")
    _check_positive_int(steps=steps, batch_size=batch_size)
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
    digits (``unnoise.modalities.audio.pipeline.audio_dataset``, 90% of 690 clips), then cached in ``cache`` (default
    ``~/.cache/unnoise``) as the folder ``digit-classifier-<rate>hz-<seconds>s`` (weights.safetensors and
    meta.json: the config, the training recipe and a fingerprint of the data); a later call loads it,
    and retrains if any of those differ.
    """
    from unnoise.modalities.audio.pipeline import audio_dataset
    from unnoise.training.loop import TrainConfig

    _check_positive_int(sample_rate=sample_rate)
    if not isinstance(seconds, (int, float)) or round(seconds * sample_rate) < 1:
        raise ValueError(f"seconds must be a positive number giving at least one sample; got {seconds!r}")
    extra = {"sample_rate": sample_rate, "seconds": float(seconds)}
    data = audio_dataset(TrainConfig(data="spoken-digits", extra=extra), "train")
    folder = Path(cache) if cache is not None else Path.home() / ".cache" / "unnoise"
    path = folder / f"digit-classifier-{sample_rate}hz-{float(seconds):g}s"
    return _cached_classifier(
        data.waves, data.labels, float(seconds), DigitClassifierConfig.for_rate(sample_rate), path, progress
    )


# ---- metrics ------------------------------------------------------------------------------------------


@torch.no_grad()
def _batched(fn, classifier: DigitClassifier, waves: Tensor, batch_size: int = 256) -> Tensor:
    """``fn(waves[i:i + batch_size])`` concatenated, in eval mode (restored afterwards), on the classifier's device."""
    _check_waves(waves)
    was_training = classifier.training
    classifier.eval()
    try:
        device = next(classifier.parameters()).device
        return torch.cat([fn(batch.to(device)).cpu() for batch in waves.split(batch_size)])
    finally:
        classifier.train(was_training)


def accuracy(classifier: DigitClassifier, waves: Tensor, labels: Tensor) -> float:
    """Fraction of clips ``(N, samples)`` whose argmax logit is their label ``(N,)``; DiffWave's SC09 accuracy."""
    if not isinstance(labels, Tensor) or labels.shape != waves.shape[:1] or labels.is_floating_point():
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an int tensor (N,) with N = len(waves) = {len(waves)}; got {got}")
    predicted = _batched(classifier, classifier, waves).argmax(dim=1)
    return (predicted == labels.cpu()).double().mean().item()


def feature_distance(classifier: DigitClassifier, generated: Tensor, real: Tensor) -> float:
    """Frechet distance between Gaussian fits of the classifier's features (DiffWave's SC09 "FID").

    ``||mu_g - mu_r||^2 + tr(C_g + C_r - 2 (C_g^1/2 C_r C_g^1/2)^1/2)`` over ``features`` ``(N, D)``;
    each set needs at least 2 clips (with fewer than D the covariances are singular, which the
    distance tolerates but which biases it upward: compare figures at equal N).
    """
    _check_waves(generated, "generated")
    _check_waves(real, "real")
    if len(generated) < 2 or len(real) < 2:
        raise ValueError(f"need at least 2 clips in each set; got {len(generated)} generated, {len(real)} real")
    fit_g = gaussian_fit(_batched(classifier.features, classifier, generated).double().numpy())
    fit_r = gaussian_fit(_batched(classifier.features, classifier, real).double().numpy())
    return frechet_distance(*fit_g, *fit_r)


def real_time_factor(seconds_of_compute: float, clips: int, clip_seconds: float) -> float:
    """``seconds_of_compute / (clips * clip_seconds)``: below 1, generation runs faster than real time."""
    if not isinstance(seconds_of_compute, (int, float)) or not 0 <= seconds_of_compute < math.inf:
        raise ValueError(f"seconds_of_compute must be a finite number >= 0; got {seconds_of_compute!r}")
    _check_positive_int(clips=clips)
    if not isinstance(clip_seconds, (int, float)) or not 0 < clip_seconds < math.inf:
        raise ValueError(f"clip_seconds must be a finite number > 0; got {clip_seconds!r}")
    return seconds_of_compute / (clips * clip_seconds)
