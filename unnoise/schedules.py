"""Noise schedules: how much signal survives at each noise level.

Every schedule answers the same questions, at integer or fractional ``t``:
``alpha_bar(t)`` (VP form, ``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``), ``sigma(t)``
(sigma-space, ``x = x0 + sigma n`` with ``sigma^2 = (1 - alpha_bar) / alpha_bar``), ``log_snr(t)``
and the inverse map ``t_from_sigma``. Three kinds exist:

- :class:`DiscreteSchedule`: ``T`` betas (DDPM and its descendants), ``t`` in ``[0, T]``;
- :class:`ContinuousVP`: Song et al. (2021) VP-SDE with linear ``beta(t)``, ``t`` in ``[0, 1]``;
- :class:`EDMRange`: Karras et al. (2022), where the time *is* sigma.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

ScheduleName = Literal["linear", "cosine", "sigmoid", "scaled_linear", "sqrt", "t_over_T", "diffwave"]
SCHEDULE_NAMES: tuple[str, ...] = ("linear", "cosine", "sigmoid", "scaled_linear", "sqrt", "t_over_T", "diffwave")


def _f64(t: Tensor | float | Sequence[float]) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """VP -> sigma-space noise level: ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """Sigma-space -> VP: ``alpha_bar = 1 / (1 + sigma^2)``."""
    return 1 / (1 + sigma**2)


class DiscreteSchedule:
    """T discrete steps with variances ``betas[t - 1] = beta_t`` for ``t = 1..T`` (Ho et al. 2020).

    ``alpha_bar[t] = prod_{s <= t} (1 - beta_s)`` with ``alpha_bar[0] = 1`` (clean data), so the
    paper's indices are the tensor's indices. At fractional ``t`` the schedule is extended by a
    constant beta inside each step: ``log alpha_bar`` is linear between integers, which makes
    ``t_from_sigma`` an exact inverse of ``sigma``.
    """

    def __init__(self, betas: Tensor | Sequence[float], *, name: str = "custom") -> None:
        betas = _f64(betas).flatten()
        if betas.numel() < 1:
            raise ValueError("betas is empty: a schedule needs T >= 1 betas in (0, 1]")
        bad = ~torch.isfinite(betas) | (betas <= 0) | (betas > 1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"beta_{i + 1} = {betas[i].item():g} is outside (0, 1]: every beta must lie in (0, 1]")
        self.name = name
        self.betas = betas
        self.T = betas.numel()
        # (T + 1,): log alpha_bar[0] = 0; -inf once some beta_t = 1.
        self.log_alpha_bar = torch.cat([betas.new_zeros(1), torch.log1p(-betas).cumsum(0)])
        self.alpha_bar = self.log_alpha_bar.exp()

    def __repr__(self) -> str:
        return f"DiscreteSchedule(name={self.name!r}, T={self.T})"

    def _log_alpha_bar_at(self, t: Tensor | float) -> Tensor:
        t = _f64(t)
        if ((t < 0) | (t > self.T)).any():
            raise ValueError(f"t must lie in [0, T] = [0, {self.T}], got {t.min().item():g}..{t.max().item():g}")
        i = t.floor().clamp(max=self.T - 1).long()
        frac = t - i
        lo, hi = self.log_alpha_bar[i], self.log_alpha_bar[i + 1]
        # Avoid 0 * -inf when the schedule ends in beta_T = 1.
        return torch.where(frac == 0, lo, torch.where(frac == 1, hi, lo + frac * (hi - lo)))

    def alpha_bar_at(self, t: Tensor | float) -> Tensor:
        return self._log_alpha_bar_at(t).exp()

    def sigma(self, t: Tensor | float) -> Tensor:
        # sigma^2 = 1 / alpha_bar - 1 = expm1(-log alpha_bar): accurate near t = 0.
        return torch.expm1(-self._log_alpha_bar_at(t)).sqrt()

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -2 * self.sigma(t).log()

    def t_from_sigma(self, sigma: Tensor | float) -> Tensor:
        """Fractional ``t`` with ``sigma(t) = sigma`` (exact inverse of the piecewise extension)."""
        sigma = _f64(sigma)
        target = -torch.log1p(sigma**2)  # log alpha_bar, decreasing in t
        neg = -self.log_alpha_bar  # increasing
        j = torch.searchsorted(neg, -target).clamp(1, self.T)
        lo, hi = neg[j - 1], neg[j]
        frac = ((-target - lo) / (hi - lo)).nan_to_num(0.0).clamp(0, 1)
        return (j - 1 + frac).to(torch.float64)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(1))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.T))


def linear_betas(T: int, beta_start: float | None = None, beta_end: float | None = None) -> Tensor:
    """DDPM's linear betas, 1e-4 to 0.02 at T = 1000 (Ho et al. 2020, Sec. 4).

    For other T the endpoints scale by 1000 / T (Nichol and Dhariwal 2021), so the process, and
    its end point alpha_bar_T ~ 4e-5, stay the same; capped at 0.999 for very small T.
    """
    scale = 1000 / T
    b0 = 1e-4 * scale if beta_start is None else beta_start
    b1 = 0.02 * scale if beta_end is None else beta_end
    return torch.linspace(b0, b1, T, dtype=torch.float64).clamp(max=0.999)


def diffwave_betas(T: int) -> Tensor:
    """DiffWave's base process (Kong et al. 2021, Sec. 4): betas linear from 1e-4 to 0.05 at T = 50.

    For other T the endpoints scale by 50 / T, as :func:`linear_betas` does, so the process stays
    the same: alpha_bar_T ~ 0.28 (sigma_max ~ 1.6). Audio needs no more noise than that: a
    peak-normalised waveform's RMS is about 0.1, so its SNR at sigma 1.6 is about -24 dB.
    """
    return linear_betas(T, 1e-4 * 50 / T, 0.05 * 50 / T)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol and Dhariwal (2021), Eq. 17: alpha_bar(t) = f(t) / f(0), f = cos^2(((t/T + s)/(1 + s)) pi/2)."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Sigmoid betas of GeoDiff (Xu et al. 2022), as diffusers' ``beta_schedule="sigmoid"``."""
    x = torch.linspace(-6, 6, T, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def scaled_linear_betas(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Linear in sqrt(beta) (latent diffusion / Stable Diffusion's defaults)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def sqrt_betas(T: int, s: float = 1e-4, max_beta: float = 0.999) -> Tensor:
    """Diffusion-LM's sqrt schedule (Li et al. 2022): alpha_bar(t) = 1 - sqrt(t/T + s)."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    ab = 1 - (t + s).sqrt()
    ab[0] = 1.0
    return (1 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def t_over_T_betas(T: int) -> Tensor:
    """beta_t = t / T: reaches beta_T = 1, so alpha_bar_T = 0 and no signal survives at t = T."""
    warnings.warn(
        "beta_t = t/T reaches beta_T = 1: all signal is destroyed (alpha_bar_T = 0) and alpha_bar "
        "is already ~0 far before T; prefer 'linear' or 'cosine'",
        UserWarning,
        stacklevel=3,
    )
    return torch.arange(1, T + 1, dtype=torch.float64) / T


_BETAS: dict[str, Callable[[int], Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "sigmoid": sigmoid_betas,
    "scaled_linear": scaled_linear_betas,
    "sqrt": sqrt_betas,
    "t_over_T": t_over_T_betas,
    "diffwave": diffwave_betas,
}


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0.

    sqrt(alpha_bar_1) is kept, so the first step is unchanged; beta_T becomes exactly 1.
    """
    sab = torch.log1p(-_f64(betas)).cumsum(0).mul(0.5).exp()
    s0, sT = sab[0].clone(), sab[-1].clone()
    sab = (sab - sT) * s0 / (s0 - sT)
    ab = sab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def make_schedule(
    schedule: ScheduleName | str | Tensor | Sequence[float] | Callable[[Tensor], Tensor] = "linear",
    T: int = 1000,
    *,
    zero_terminal_snr: bool = False,
    **kwargs: float,
) -> DiscreteSchedule:
    """A discrete schedule from a name, an array of T betas, or a function of ``t / T`` in (0, 1].

    A function receives the float64 tensor ``[1/T, 2/T, ..., 1]`` and returns the T betas.
    ``kwargs`` go to the named schedule (e.g. ``beta_start``, ``s``).
    """
    if isinstance(schedule, str):
        if schedule not in _BETAS:
            raise ValueError(f"unknown beta schedule {schedule!r}; allowed: {', '.join(SCHEDULE_NAMES)}")
        _check_T(T)
        betas, name = _BETAS[schedule](T, **kwargs), schedule
    elif callable(schedule):
        _check_T(T)
        betas = _f64(schedule(torch.arange(1, T + 1, dtype=torch.float64) / T))
        if betas.shape != (T,):
            raise ValueError(f"beta function returned shape {tuple(betas.shape)}; expected ({T},)")
        name = getattr(schedule, "__name__", "function")
    else:
        betas, name = _f64(schedule), "custom"
        if betas.ndim != 1:
            raise ValueError(f"betas must be a 1-D array of T values, got shape {tuple(betas.shape)}")
    if zero_terminal_snr:
        betas, name = rescale_zero_terminal_snr(betas), name + "+zero_terminal_snr"
    return DiscreteSchedule(betas, name=name)


def _check_T(T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T must be an integer >= 1, got {T!r}")


@dataclass(frozen=True)
class ContinuousVP:
    """Song et al. (2021) VP-SDE: beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1].

    alpha_bar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        if not 0 <= self.beta_min <= self.beta_max or self.beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got {self.beta_min}, {self.beta_max}")

    def _log_alpha_bar_at(self, t: Tensor | float) -> Tensor:
        t = _f64(t)
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def alpha_bar_at(self, t: Tensor | float) -> Tensor:
        return self._log_alpha_bar_at(t).exp()

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.expm1(-self._log_alpha_bar_at(t)).sqrt()

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -2 * self.sigma(t).log()

    def t_from_sigma(self, sigma: Tensor | float) -> Tensor:
        # Solve (beta_max - beta_min)/2 t^2 + beta_min t - log(1 + sigma^2) = 0 for t >= 0.
        c = torch.log1p(_f64(sigma) ** 2)
        a = 0.5 * (self.beta_max - self.beta_min)
        if a == 0:
            return c / self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 4 * a * c).sqrt()) / (2 * a)

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(1e-3))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(1.0))


@dataclass(frozen=True)
class EDMRange:
    """Karras et al. (2022): time is sigma itself, sigma in [sigma_min, sigma_max]; data scale sigma_data."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    def sigma(self, t: Tensor | float) -> Tensor:
        return _f64(t)

    def t_from_sigma(self, sigma: Tensor | float) -> Tensor:
        return _f64(sigma)

    def alpha_bar_at(self, t: Tensor | float) -> Tensor:
        return alpha_bar_from_sigma(_f64(t))

    def log_snr(self, t: Tensor | float) -> Tensor:
        return -2 * _f64(t).log()
