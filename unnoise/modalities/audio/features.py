"""The log-mel front end of audio metrics: HTK-mel triangular filters and ``log(M |STFT|^2 + 1e-6)``.

Also the argument checks the audio metrics share (float clips ``(N, samples)``, positive ints).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["log_mel", "mel_filterbank"]


def check_waves(waves: object, what: str = "waves") -> None:
    if not isinstance(waves, Tensor) or not waves.is_floating_point() or waves.ndim != 2 or 0 in waves.shape:
        got = f"{waves.dtype} {tuple(waves.shape)}" if isinstance(waves, Tensor) else type(waves).__name__
        raise ValueError(f"{what} must be a non-empty float tensor (N, samples) in [-1, 1]; got {got}")


def check_positive_int(**values: object) -> None:
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
    check_positive_int(n_fft=n_fft, n_mels=n_mels, sample_rate=sample_rate)
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


def apply_log_mel(waves: Tensor, filters: Tensor, window: Tensor, hop: int) -> Tensor:
    """``log(filters @ |STFT|^2 + 1e-6)``: ``(N, samples)`` -> ``(N, n_mels, 1 + samples // hop)``."""
    n_fft = len(window)
    spec = torch.stft(waves, n_fft, hop, window=window, center=True, return_complex=True)  # (N, F, T)
    power = spec.real**2 + spec.imag**2
    return torch.log(filters @ power + 1e-6)  # (n_mels, F) @ (N, F, T) -> (N, n_mels, T)


def check_front_end(samples: int, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> None:
    check_positive_int(sample_rate=sample_rate, n_fft=n_fft, hop=hop, n_mels=n_mels)
    if samples <= n_fft // 2:  # center=True reflect-pads n_fft // 2 samples each side
        raise ValueError(f"clips must be longer than n_fft // 2 = {n_fft // 2} samples; got {samples}")


def log_mel(waves: Tensor, sample_rate: int, n_fft: int = 256, hop: int = 80, n_mels: int = 40) -> Tensor:
    """Log-mel spectrogram: ``(N, samples)`` -> ``(N, n_mels, 1 + samples // hop)``.

    ``S = log(M |X|^2 + 1e-6)`` with ``X`` the STFT (Hann window of ``n_fft`` samples, hop ``hop``,
    ``center=True`` with reflection padding, no normalisation: a full-scale sine of amplitude A
    gives ``|X| ~ A n_fft / 4`` at its bin) and ``M`` = :func:`mel_filterbank` (``f_min`` 0, ``f_max``
    Nyquist). The defaults are 32 ms windows every 10 ms at 8 kHz. Computed in the waves' dtype.
    """
    check_waves(waves)
    check_front_end(waves.shape[-1], sample_rate, n_fft, hop, n_mels)
    filters = mel_filterbank(n_fft, n_mels, sample_rate, dtype=waves.dtype).to(waves.device)
    return apply_log_mel(waves, filters, torch.hann_window(n_fft, dtype=waves.dtype, device=waves.device), hop)
