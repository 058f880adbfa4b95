"""Samplers: one pure function per method over any denoiser and a decreasing sigma grid.

Contract (DESIGN.md): ``sample_<name>(denoise, x, sigmas, *, generator=None, callback=None) -> x``.
``denoise(x, sigma) -> x0_hat`` works in sigma-space (x = x0 + sigma n), ``sigma`` a 0-dim tensor;
``sigmas`` decreases and ends in 0; ``x`` is the sample at ``sigmas[0]``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
