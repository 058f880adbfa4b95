"""Clip preparation: PCM WAV reading, band-limited resampling, fixed length and peak normalisation.

Clips are float waveforms in [-1, 1]; :mod:`unnoise.modalities.audio.data` builds data sets from them.
"""

from __future__ import annotations

import functools
import math
import wave
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["fit_length", "normalise", "read_wav", "resample"]

_SAMPLE_WIDTHS = {1: "8-bit unsigned", 2: "16-bit", 3: "24-bit", 4: "32-bit"}


def read_wav(path: str | Path) -> tuple[Tensor, int]:
    """A PCM WAV file -> (float32 ``(samples,)`` in [-1, 1], sample rate); channels are averaged to mono.

    Reads 8-bit (unsigned), 16-, 24- and 32-bit integer PCM with Python's ``wave`` module; anything
    else (float or compressed WAV, a non-WAV file, a truncated file, zero samples) raises ValueError.
    """
    path = Path(path)
    allowed = "a PCM WAV file with 8-, 16-, 24- or 32-bit integer samples"
    try:
        with wave.open(str(path), "rb") as f:
            channels, width, rate, frames = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(frames)
    except (wave.Error, EOFError) as err:
        raise ValueError(f"cannot read {path}: {err or 'unexpected end of file'}; need {allowed}") from err
    if width not in _SAMPLE_WIDTHS:
        raise ValueError(f"{path} has {8 * width}-bit samples; need {allowed}")
    if channels < 1 or rate < 1:
        raise ValueError(f"{path} has a corrupt header ({channels} channels, {rate} Hz); need {allowed}")
    if len(raw) < frames * channels * width:
        raise ValueError(
            f"truncated WAV file {path}: header says {frames} frames, found {len(raw) // (channels * width)}"
        )
    if frames == 0:
        raise ValueError(f"{path} holds 0 samples; need at least one")
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 3:  # 24-bit little-endian: place each sample in the top 3 bytes of an int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (np.pad(b, ((0, 0), (1, 0))).copy().view("<i4")[:, 0].astype(np.float32)) / 2.0**31
    else:
        dtype = "<i2" if width == 2 else "<i4"
        x = np.frombuffer(raw, dtype).astype(np.float32) / 2.0 ** (8 * width - 1)
    x = x.reshape(frames, channels).mean(axis=1)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), rate


def resample(x: Tensor, from_rate: int, to_rate: int, zeros: int = 16, rolloff: float = 0.94) -> Tensor:
    """Band-limited resampling by windowed-sinc interpolation: ``(..., n)`` -> ``(..., round(n * to / from))``.

    Output sample k sits at input time ``t_k = k * from_rate / to_rate`` and is
    ``sum_n x[n] h(t_k - n)``, with ``h(d) = c sinc(c d) w(d)``: an ideal low-pass at ``c = rolloff *
    min(1, to / from)`` of the input's Nyquist frequency (so downsampling removes what would alias),
    truncated to ``zeros`` zero-crossings each side by a Kaiser window (beta 8.6). Outside the clip
    the signal is taken as zero.
    """
    if not (isinstance(from_rate, int) and isinstance(to_rate, int) and from_rate > 0 and to_rate > 0):
        raise ValueError(f"sample rates must be positive ints (Hz); got {from_rate!r} -> {to_rate!r}")
    if from_rate == to_rate:
        return x.clone()
    n = x.shape[-1]
    out_len = max(1, round(n * to_rate / from_rate))
    # t_k = k * down / up exactly; its fractional part cycles through `up` phases, so the kernel is
    # tabulated once per phase (polyphase) and shared by every clip with the same pair of rates.
    g = math.gcd(from_rate, to_rate)
    up, down = to_rate // g, from_rate // g
    k = torch.arange(out_len)
    base, phase = (k * down) // up, (k * down) % up  # t_k = base + phase / up
    table, offsets = _sinc_table(up, down, zeros, rolloff)  # (up, taps), (taps,)
    idx = base[:, None] + offsets  # (out_len, taps): the input samples each output sums over
    dtype = x.dtype if x.is_floating_point() else torch.float32
    h = (table[phase] * ((idx >= 0) & (idx < n))).to(dtype)
    gathered = x.to(dtype)[..., idx.clamp(0, n - 1)]  # (..., out_len, taps)
    return (gathered * h).sum(-1)


@functools.lru_cache(maxsize=16)
def _sinc_table(up: int, down: int, zeros: int, rolloff: float) -> tuple[Tensor, Tensor]:
    """Kaiser-windowed sinc taps ``h(r / up - j)`` for phases r < up and integer offsets j: ``(up, taps)``."""
    cutoff = rolloff * min(1.0, up / down)
    half = zeros / cutoff  # half-width of the kernel, in input samples
    offsets = torch.arange(-math.ceil(half), math.ceil(half) + 1)
    d = torch.arange(up, dtype=torch.float64)[:, None] / up - offsets  # (up, taps)
    beta = torch.tensor(8.6, dtype=torch.float64)
    window = torch.special.i0(beta * (1 - (d / half).clamp(-1, 1) ** 2).sqrt()) / torch.special.i0(beta)
    return cutoff * torch.sinc(cutoff * d) * window * (d.abs() < half), offsets


def fit_length(x: Tensor, samples: int) -> Tensor:
    """Center-crop or zero-pad the last axis to ``samples``: ``(..., n)`` -> ``(..., samples)``.

    Cropping keeps the middle; padding puts the clip in the middle (half the zeros each side), so a
    short spoken word ends up centred in its window.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int; got {samples!r}")
    n = x.shape[-1]
    if n >= samples:
        start = (n - samples) // 2
        return x[..., start : start + samples].clone()
    left = (samples - n) // 2
    return torch.nn.functional.pad(x, (left, samples - n - left))


def normalise(x: Tensor, peak: float = 0.95) -> Tensor:
    """Scale each clip (last axis) so its largest ``|x|`` is ``peak``; an all-zero clip stays zero."""
    top = x.abs().amax(dim=-1, keepdim=True)
    return torch.where(top > 0, x * (peak / top.clamp_min(torch.finfo(x.dtype).tiny)), torch.zeros_like(x))
