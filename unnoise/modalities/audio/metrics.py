"""Audio sample quality as DiffWave measures it: classifier accuracy, feature distance, real-time factor.

DiffWave (Kong et al. 2021, sec. 5) scores SC09 samples with a classifier trained on SC09: the
accuracy of class-conditional samples, and a Frechet distance between Gaussian fits of generated
and real clips in the classifier's feature space (their "FID"). Here the classifier is
:func:`unnoise.modalities.audio.classifier.digit_classifier` (log-mel front end in
:mod:`unnoise.modalities.audio.features`):

- ``accuracy``, ``feature_distance`` and ``real_time_factor`` (compute time / audio time).

Clips are float waveforms ``(N, samples)`` in [-1, 1] at the classifier's sample rate (8 kHz, 1 s
by default); nothing here resamples, so pass clips at ``classifier.config.sample_rate``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unnoise.metrics import frechet_distance, gaussian_fit
from unnoise.modalities.audio.classifier import DigitClassifier
from unnoise.modalities.audio.features import check_positive_int, check_waves

__all__ = ["accuracy", "feature_distance", "real_time_factor"]


@torch.no_grad()
def _batched(fn, classifier: DigitClassifier, waves: Tensor, batch_size: int = 256) -> Tensor:
    """``fn(waves[i:i + batch_size])`` concatenated, in eval mode (restored afterwards), on the classifier's device."""
    check_waves(waves)
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
    check_waves(generated, "generated")
    check_waves(real, "real")
    if len(generated) < 2 or len(real) < 2:
        raise ValueError(f"need at least 2 clips in each set; got {len(generated)} generated, {len(real)} real")
    fit_g = gaussian_fit(_batched(classifier.features, classifier, generated).double().numpy())
    fit_r = gaussian_fit(_batched(classifier.features, classifier, real).double().numpy())
    return frechet_distance(*fit_g, *fit_r)


def real_time_factor(seconds_of_compute: float, clips: int, clip_seconds: float) -> float:
    """``seconds_of_compute / (clips * clip_seconds)``: below 1, generation runs faster than real time."""
    if not isinstance(seconds_of_compute, (int, float)) or not 0 <= seconds_of_compute < math.inf:
        raise ValueError(f"seconds_of_compute must be a finite number >= 0; got {seconds_of_compute!r}")
    check_positive_int(clips=clips)
    if not isinstance(clip_seconds, (int, float)) or not 0 < clip_seconds < math.inf:
        raise ValueError(f"clip_seconds must be a finite number > 0; got {clip_seconds!r}")
    return seconds_of_compute / (clips * clip_seconds)
