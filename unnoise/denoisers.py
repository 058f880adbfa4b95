"""Preconditioning wrappers: a network becomes a denoiser ``D(x, sigma) -> x0_hat`` in sigma-space.

Sigma-space (DESIGN.md): ``x = x0 + sigma n``, ``n ~ N(0, I)``; ``x`` has shape ``(B, ...)`` and
``sigma`` shape ``()`` or ``(B,)``. Every wrapper follows Karras et al. (2022), Eq. 7:
``D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))``, one small
wrapper per parameterization:

- :class:`DiscreteDenoiser` (:func:`from_discrete`): a VP network of integer steps t = 1..T (DDPM);
- :class:`ContinuousDenoiser` (:func:`from_continuous`): a VP network of continuous time (VP-SDE);
- :class:`EDMPrecond`: an EDM network F with Table 1's preconditioning;
- :func:`from_diffusers_unet`: a diffusers ``UNet2DModel`` and the scheduler it was trained with.

For VP networks ``c_in = sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2)`` (so the network sees ``x_t``)
and the output is turned into x0 with the *actual* sigma of ``x``, never the sigma of a rounded
step (k-diffusion's convention): an exact eps-network gives an exact denoiser at every sigma.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol

import torch
from torch import Tensor

from unnoise.diffusion import PREDICTIONS, Prediction, expand, x0_from_prediction
from unnoise.sampling.samplers import Denoiser
from unnoise.schedules import DiscreteSchedule

__all__ = [
    "DIFFUSERS_PREDICTIONS",
    "ContinuousDenoiser",
    "Denoiser",
    "DiscreteDenoiser",
    "EDMCoefficients",
    "EDMPrecond",
    "edm_coefficients",
    "edm_training_target",
    "from_continuous",
    "from_diffusers_unet",
    "from_discrete",
]

Network = Callable[[Tensor, Tensor], Tensor]  # model(input (B, ...), time or noise level (B,)) -> (B, ...)
TMap = Literal["interp", "nearest"]
VarianceOutput = Literal["fixed", "learned_range"]
T_MAPS: tuple[str, ...] = ("interp", "nearest")
VARIANCE_OUTPUTS: tuple[str, ...] = ("fixed", "learned_range")
DIFFUSERS_PREDICTIONS: dict[str, Prediction] = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


class TimeSchedule(Protocol):
    def t_from_sigma(self, sigma: Tensor | float) -> Tensor: ...


def _check_choice(what: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def _as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma in x's dtype and device, shape () or (B,) (ValueError otherwise)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    expand(sigma, x)  # validates the shape
    return sigma


def _sigma64(sigma: Tensor | float) -> Tensor:
    """sigma as a float64 CPU tensor, for the sigma -> t map (schedules keep float64 CPU tables)."""
    sigma = sigma.detach().cpu().double() if isinstance(sigma, Tensor) else torch.tensor(sigma, dtype=torch.float64)
    if not (sigma >= 0).all():
        raise ValueError(f"sigma must be >= 0 (not NaN), got {sigma.min().item():g}")
    return sigma


def _per_sample(a: Tensor, x: Tensor) -> Tensor:
    """A () or (B,) tensor as a (B,) tensor in x's dtype and device (what networks receive)."""
    return a.to(device=x.device, dtype=x.dtype).expand(x.shape[0])


class _VPDenoiser(ABC):
    """Shared VP -> sigma-space conversion; subclasses say which time the network receives.

    ``alpha_bar = 1 / (1 + sigma^2)``, ``x_t = sqrt(alpha_bar) x`` (c_in), ``out = model(x_t, t)``;
    eps: ``x0 = x - sigma eps``; x0 / v: :func:`unnoise.diffusion.x0_from_prediction` on ``x_t``.
    """

    model: Network
    schedule: Any
    prediction: Prediction
    variance: VarianceOutput = "fixed"

    @abstractmethod
    def timestep(self, sigma: Tensor) -> Tensor:
        """The time the network receives at a float64 CPU ``sigma`` of shape () or (B,) (shape kept)."""

    def _forward(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor | None]:
        # t from sigma at its own precision (float64 on the CPU), the conversion in x's dtype.
        sigma, t = _as_sigma(sigma, x), _per_sample(self.timestep(_sigma64(sigma)), x)
        alpha_bar = 1 / (1 + sigma**2)
        x_t = expand(alpha_bar, x).sqrt() * x
        out = self.model(x_t, t)
        v = None
        if self.variance == "learned_range":
            if out.ndim < 2 or out.shape[1] != 2 * x.shape[1]:
                raise ValueError(
                    f"variance='learned_range' needs 2 x {x.shape[1]} output channels on dim 1 "
                    f"([prediction, v]), got output shape {tuple(out.shape)}"
                )
            out, v = out.chunk(2, dim=1)
        if out.shape != x.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} != input shape {tuple(x.shape)}")
        if self.prediction == "eps":
            x0 = x - expand(sigma, x) * out
        else:
            x0 = x0_from_prediction(out, x_t, alpha_bar, self.prediction)
        return x0.to(x.dtype), v

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """x0_hat = D(x, sigma): ``x`` (B, ...), ``sigma`` () or (B,) -> (B, ...) in x's dtype."""
        return self._forward(x, sigma)[0]

    @property
    def sigma_min(self) -> float:
        return float(self.schedule.sigma_min)

    @property
    def sigma_max(self) -> float:
        return float(self.schedule.sigma_max)


class DiscreteDenoiser(_VPDenoiser):
    """A VP network of discrete steps as a sigma-space denoiser (Ho et al. 2020; k-diffusion).

    ``model(x_t, t)`` was trained on ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` at
    the schedule's steps t = 1..T. The sigma -> t map: with ``t_map="interp"``,
    ``t = schedule.t_from_sigma(sigma)``, the fractional t with ``schedule.sigma(t) = sigma``
    (``log alpha_bar`` linear between steps; sigma above ``sigma_max`` gives t = T, below
    ``sigma_min`` a t in [0, 1)). With ``t_map="nearest"`` that t is rounded to the nearest integer
    and clamped to 1..T. The network receives ``t - timestep_offset`` as a (B,) tensor in x's
    dtype (``timestep_offset=1`` for networks indexed 0..T-1, as in diffusers). Build with
    :func:`from_discrete`.
    """

    def __init__(
        self,
        model: Network,
        schedule: DiscreteSchedule,
        *,
        prediction: Prediction = "eps",
        t_map: TMap = "interp",
        timestep_offset: int = 0,
        variance: VarianceOutput = "fixed",
    ) -> None:
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("t_map", t_map, T_MAPS)
        _check_choice("variance", variance, VARIANCE_OUTPUTS)
        if not isinstance(timestep_offset, int) or isinstance(timestep_offset, bool):
            raise ValueError(
                f"timestep_offset must be an int (0 for steps 1..T, 1 for 0..T-1), got {timestep_offset!r}"
            )
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.t_map, self.timestep_offset, self.variance = t_map, timestep_offset, variance

    def __repr__(self) -> str:
        return (
            f"DiscreteDenoiser({self.schedule!r}, prediction={self.prediction!r}, t_map={self.t_map!r}, "
            f"timestep_offset={self.timestep_offset}, variance={self.variance!r})"
        )

    def timestep(self, sigma: Tensor) -> Tensor:
        """Network time at ``sigma``: ``t_from_sigma(sigma)`` (rounded if "nearest") minus the offset."""
        t = self.schedule.t_from_sigma(sigma)
        if self.t_map == "nearest":
            t = t.round().clamp(1, self.schedule.T)
        return t - self.timestep_offset

    def with_variance(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        """(x0_hat, frac) from one network call, for ``variance="learned_range"`` (iDDPM Eq. 15).

        ``frac = (v + 1) / 2`` clamped to [0, 1], shape (B, C, ...) like x: the reverse step's
        log-variance is ``frac log beta_t + (1 - frac) log beta_tilde_t``.
        """
        if self.variance != "learned_range":
            raise ValueError(f"with_variance needs variance='learned_range', this denoiser has {self.variance!r}")
        x0, v = self._forward(x, sigma)
        assert v is not None
        return x0, ((v + 1) / 2).clamp(0, 1).to(x.dtype)


from_discrete = DiscreteDenoiser  # the function-style name used across the package


class ContinuousDenoiser(_VPDenoiser):
    """A VP network of continuous time as a sigma-space denoiser (Song et al. 2021, VP-SDE).

    ``model(x_t, t)`` receives ``t = schedule.t_from_sigma(sigma)`` (in [0, 1] for
    :class:`unnoise.schedules.ContinuousVP`, unclamped) as a (B,) tensor in x's dtype, and
    ``x_t = x / sqrt(1 + sigma^2)``. Build with :func:`from_continuous`.
    """

    def __init__(self, model: Network, schedule: TimeSchedule, *, prediction: Prediction = "eps") -> None:
        _check_choice("prediction", prediction, PREDICTIONS)
        self.model, self.schedule, self.prediction = model, schedule, prediction

    def __repr__(self) -> str:
        return f"ContinuousDenoiser({self.schedule!r}, prediction={self.prediction!r})"

    def timestep(self, sigma: Tensor) -> Tensor:
        return self.schedule.t_from_sigma(sigma)


from_continuous = ContinuousDenoiser


class EDMCoefficients(NamedTuple):
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> EDMCoefficients:
    """Karras et al. (2022), Table 1 (EDM column); ``sigma`` of any shape, results of the same shape.

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4, with sd = sigma_data.
    """
    total = sigma**2 + sigma_data**2
    return EDMCoefficients(sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4)


def _check_sigma_data(sigma_data: float) -> None:
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0 (the data's standard deviation), got {sigma_data!r}")


class EDMPrecond:
    """Karras et al. (2022), Eq. 7 with Table 1: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

    ``F(input (B, ...), c_noise (B,)) -> (B, ...)``; ``x`` (B, ...), ``sigma`` () or (B,), > 0.
    """

    def __init__(self, F: Network, sigma_data: float = 0.5) -> None:
        _check_sigma_data(sigma_data)
        self.F, self.sigma_data = F, sigma_data

    def __repr__(self) -> str:
        return f"EDMPrecond(sigma_data={self.sigma_data})"

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = _as_sigma(sigma, x)
        c = edm_coefficients(sigma, self.sigma_data)
        out = self.F(expand(c.c_in, x) * x, _per_sample(c.c_noise, x))
        return expand(c.c_skip, x) * x + expand(c.c_out, x) * out.to(x.dtype)


def edm_training_target(x0: Tensor, x: Tensor, sigma: Tensor | float, sigma_data: float = 0.5) -> Tensor:
    """Karras et al. (2022), Eq. 8: F's regression target (x0 - c_skip x) / c_out, shape of x.

    ``x0`` and ``x = x0 + sigma n`` (B, ...), ``sigma`` () or (B,), > 0. When F returns it,
    :class:`EDMPrecond` returns x0.
    """
    _check_sigma_data(sigma_data)
    c_skip, c_out, _, _ = (expand(c, x) for c in edm_coefficients(_as_sigma(sigma, x), sigma_data))
    return (x0 - c_skip * x) / c_out


def from_diffusers_unet(unet: Any, scheduler: Any) -> DiscreteDenoiser:
    """Wrap a diffusers ``UNet2DModel`` and its training scheduler (e.g. ``DDPMScheduler``) as ``D(x, sigma)``.

    The schedule is ``DiscreteSchedule(scheduler.betas)`` in float64; ``prediction_type``
    "epsilon" / "v_prediction" / "sample" maps to "eps" / "v" / "x0"; diffusers indexes steps
    0..T-1, hence ``timestep_offset=1``. ``variance_type="learned_range"`` gives a learned-range
    denoiser (see :meth:`DiscreteDenoiser.with_variance`). diffusers itself need not be imported:
    both objects are used through their attributes only.
    """
    config = scheduler.config
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in DIFFUSERS_PREDICTIONS:
        raise ValueError(
            f"unknown diffusers prediction_type {prediction_type!r}; allowed: {', '.join(DIFFUSERS_PREDICTIONS)}"
        )
    variance: VarianceOutput = "learned_range" if config.get("variance_type") == "learned_range" else "fixed"
    schedule = DiscreteSchedule(torch.as_tensor(scheduler.betas).double(), name=f"diffusers:{type(scheduler).__name__}")

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        return unet(x_t, t).sample

    return from_discrete(
        model, schedule, prediction=DIFFUSERS_PREDICTIONS[prediction_type], timestep_offset=1, variance=variance
    )


def clipped(denoise: Denoiser, low: float = -1.0, high: float = 1.0) -> Denoiser:
    """D clamped to the data's range (DDPM's ``clip_denoised``): x0 estimates from eps-networks at
    high noise carry the eps error times sigma (2e4 for the cosine schedule), far outside [-1, 1]."""

    def clip(x: Tensor, sigma: Tensor) -> Tensor:
        return denoise(x, sigma).clamp(low, high)

    return clip


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run natively on ``device`` (CUDA with bf16, or a CPU with AVX512-BF16 or
    AMX). Elsewhere (e.g. an AVX2-only CPU) bf16 autocast is emulated and tens of times slower than
    float32, so sampling a bf16-trained run stays in float32 there."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)


def bf16_autocast(net: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``net(x, ...)`` under bfloat16 autocast, its output cast back to x's dtype.

    Only the network's matmuls and convolutions run in bf16; the sampler's arithmetic stays in
    x's precision. For networks trained under bf16 autocast, whose CPU forward is then ~2x faster.
    """

    def run(x: Tensor, *args, **kwargs) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = net(x, *args, **kwargs)
        return out.to(x.dtype)

    return run
