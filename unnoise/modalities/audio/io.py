"""Audio writers: a 16-bit PCM WAV of one clip, a PNG grid of log-magnitude spectrograms.

Both take float waveforms in [-1, 1] (the model's space, see ``unnoise.modalities.audio.data``) and write
atomically, as ``unnoise.modalities.image.io`` does: a temporary file beside the target, then ``os.replace``.
"""

from __future__ import annotations

import math
import wave as wavfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from unnoise.modalities.image.io import _atomic_write

__all__ = ["save_spectrogram_grid", "save_wav", "spectrogram_db"]


def _check_rate(sample_rate: int) -> None:
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive int (Hz); got {sample_rate!r}")


def save_wav(path: str | Path, wave: Tensor, sample_rate: int) -> Path:
    """Write ``wave`` float ``(samples,)`` as mono 16-bit PCM: ``round(clip(x, -1, 1) * 32767)``. Returns the path."""
    _check_rate(sample_rate)
    if not isinstance(wave, Tensor) or not wave.is_floating_point() or wave.ndim != 1 or len(wave) == 0:
        got = f"{wave.dtype} {tuple(wave.shape)}" if isinstance(wave, Tensor) else type(wave).__name__
        raise ValueError(f"wave must be a non-empty float tensor (samples,) in [-1, 1]; got {got}")
    if not torch.isfinite(wave).all():
        raise ValueError(f"wave has {int((~torch.isfinite(wave)).sum())} NaN/inf samples; only finite audio is written")
    pcm = (wave.detach().cpu().double().clamp(-1, 1) * 32767).round().to(torch.int16).numpy().astype("<i2")

    def write(f) -> None:
        with wavfile.open(f, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.setnframes(len(pcm))
            w.writeframes(pcm.tobytes())

    return _atomic_write(path, write)


def spectrogram_db(waves: Tensor, n_fft: int = 256, hop: int | None = None, top_db: float = 80.0) -> Tensor:
    """Log-magnitude STFT (Hann window): ``(N, samples)`` -> dB ``(N, n_fft // 2 + 1, 1 + samples // hop)``.

    ``20 log10 |STFT|``, floored at ``top_db`` below the batch's loudest bin (one scale for all clips).
    """
    if n_fft < 2:
        raise ValueError(f"n_fft must be an int >= 2; got {n_fft!r}")
    hop = hop or n_fft // 4
    x = waves.detach().cpu().float()
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=True, return_complex=True)
    db = 20 * spec.abs().clamp_min(1e-10).log10()
    return db.clamp_min(db.max() - top_db)


def save_spectrogram_grid(
    path: str | Path,
    waves: Tensor,
    sample_rate: int,
    ncols: int | None = None,
    n_fft: int | None = None,
    padding: int = 2,
) -> Path:
    """Write each clip of ``waves`` float ``(N, samples)`` as a log-magnitude spectrogram, tiled in one grey PNG.

    ``n_fft`` defaults to the power of two nearest 32 ms at ``sample_rate`` (256 at 8 kHz), hop
    ``n_fft // 4``; each tile is ``(n_fft // 2 + 1) x (1 + samples // hop)`` pixels, low frequencies
    at the bottom, -80 dB..max mapped to black..white. ``ncols`` tiles per row (default ~sqrt(N)),
    ``padding`` black pixels between and around them. Returns the path.
    """
    from PIL import Image

    _check_rate(sample_rate)
    if not isinstance(waves, Tensor) or not waves.is_floating_point() or waves.ndim != 2 or 0 in waves.shape:
        got = f"{waves.dtype} {tuple(waves.shape)}" if isinstance(waves, Tensor) else type(waves).__name__
        raise ValueError(f"waves must be a non-empty float tensor (N, samples); got {got}")
    n_fft = n_fft or 2 ** round(math.log2(0.032 * sample_rate))
    ncols = ncols or math.ceil(math.sqrt(len(waves)))
    if ncols < 1 or padding < 0:
        raise ValueError(f"need ncols >= 1 and padding >= 0; got {ncols}, {padding}")
    db = spectrogram_db(waves, max(2, n_fft))
    lo, hi = db.min(), db.max()
    tiles = ((db - lo) / (hi - lo).clamp_min(1e-6) * 255).round().to(torch.uint8).flip(1)  # (N, F, T), low f at bottom
    n, h, w = tiles.shape
    rows = math.ceil(n / ncols)
    grid = np.zeros((rows * (h + padding) + padding, ncols * (w + padding) + padding), np.uint8)
    for i, tile in enumerate(tiles.numpy()):
        top, left = padding + (i // ncols) * (h + padding), padding + (i % ncols) * (w + padding)
        grid[top : top + h, left : left + w] = tile
    picture = Image.fromarray(grid)
    return _atomic_write(path, lambda f: picture.save(f, format="PNG"))
