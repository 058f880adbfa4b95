"""``DiffusionModel``: a thin facade over the discrete-time functions, for the common case.

Shaped like the essay's example, but each method is one phase of the process (the essay's
forward() ran noising and denoising in one call, and its reverse step was not the posterior
mean). It holds no math: everything is a call into diffusion.py, schedules.py and losses.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from unnoise.diffusion import Prediction, Variance, p_mean_variance, p_sample, q_sample, reverse_table
from unnoise.elbo import DatasetELBO, Decoder, elbo_bpd
from unnoise.losses import LossAwareSampler, LossKind, UniformSampler, diffusion_loss
from unnoise.schedules import make_schedule

TimestepSampling = Literal["uniform", "loss_aware"]


class DiffusionModel(nn.Module):
    """A DDPM-family model: network + schedule + parameterization + loss.

    Args:
        model: network ``model(x_t, t) -> output`` with ``t`` a float ``(B,)`` tensor in 1..T.
        T: number of diffusion steps.
        beta_schedule: a name from :data:`unnoise.schedules.SCHEDULE_NAMES`, an array of T betas,
            or a function of t/T (see :func:`unnoise.schedules.make_schedule`).
        prediction: what the network predicts: ``"eps"``, ``"x0"`` or ``"v"``.
        variance: ``"fixed_small"`` (beta_tilde), ``"fixed_large"`` (beta) or ``"learned_range"``.
        loss: ``"simple"``, ``"hybrid"`` (needs learned_range) or ``"vlb"``.
        timestep_sampling: ``"uniform"`` or ``"loss_aware"`` (iDDPM importance sampling).
        decoder: L_0 for 8-bit data in [-1, 1] (``"discretized"``) or continuous data (``"gaussian"``).
        data_shape: shape of one sample, so that ``sample(n)`` knows what to draw.
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        *,
        T: int = 1000,
        beta_schedule: str | Sequence[float] | Tensor | Callable[[Tensor], Tensor] = "linear",
        prediction: Prediction = "eps",
        variance: Variance = "fixed_small",
        loss: LossKind = "simple",
        hybrid_lambda: float = 1e-3,
        min_snr_gamma: float | None = None,
        timestep_sampling: TimestepSampling = "uniform",
        decoder: Decoder = "discretized",
        clip_x0: bool = False,
        zero_terminal_snr: bool = False,
        data_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.schedule = make_schedule(beta_schedule, T, zero_terminal_snr=zero_terminal_snr)
        self.table = reverse_table(self.schedule)
        samplers = {"uniform": UniformSampler, "loss_aware": LossAwareSampler}
        if timestep_sampling not in samplers:
            raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; allowed: uniform, loss_aware")
        self.timesteps = samplers[timestep_sampling](self.schedule.T)
        self.prediction, self.variance, self.loss_kind = prediction, variance, loss
        self.hybrid_lambda, self.min_snr_gamma = hybrid_lambda, min_snr_gamma
        self.decoder, self.clip_x0 = decoder, clip_x0
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        # Fail at construction, not at the first training step, on a bad option.
        self._check_options()

    def _check_options(self) -> None:
        x = torch.zeros(1, 1)
        t = torch.ones(1, dtype=torch.long)
        channels = 2 if self.variance == "learned_range" else 1
        p_mean_variance(x.repeat(1, channels), x, t, self.table, prediction=self.prediction, variance=self.variance)
        if self.loss_kind == "hybrid" and self.variance != "learned_range":
            raise ValueError("loss='hybrid' trains a learned variance: it needs variance='learned_range'")

    @property
    def T(self) -> int:
        return self.schedule.T

    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None, generator=None) -> Tensor:
        """Draw x_t ~ q(x_t | x0) in closed form; ``t`` an int or ``(B,)`` ints in 0..T."""
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype) if noise is None else noise
        ab = self.schedule.alpha_bar[torch.as_tensor(t).long().cpu()].to(x0.dtype)
        return q_sample(x0, ab, noise.to(x0))

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scalar training loss of a batch ``(B, ...)``: t from the timestep sampler, fresh noise."""
        t, weights = self.timesteps.sample(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        terms = diffusion_loss(
            self.model,
            x0,
            t.to(x0.device),
            noise,
            self.table,
            prediction=self.prediction,
            variance=self.variance,
            kind=self.loss_kind,
            hybrid_lambda=self.hybrid_lambda,
            min_snr_gamma=self.min_snr_gamma,
            decoder=self.decoder,
        )
        self.timesteps.update(t, terms.loss)
        return (terms.loss * weights.to(terms.loss)).mean()

    @torch.no_grad()
    def sample(
        self,
        n_or_shape: int | Sequence[int],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Ancestral sampling, x_T ~ N(0, I) then x_{t-1} ~ p(x_{t-1} | x_t) for t = T..1 (DDPM Alg. 2).

        ``callback(t, x_t, x0_hat)`` sees each step (for trajectories).
        """
        shape = self._shape(n_or_shape)
        x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        steps = range(self.T, 0, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="sampling", leave=False)
        for t_int in steps:
            t = torch.full((shape[0],), t_int, dtype=torch.long, device=device)
            out = self.model(x, t.to(dtype))
            step = p_mean_variance(
                out, x, t, self.table, prediction=self.prediction, variance=self.variance, clip_x0=self.clip_x0
            )
            x_prev = p_sample(step, t, torch.randn(shape, generator=generator, dtype=dtype).to(device))
            if callback is not None:
                callback(t_int, x, step.x0)
            x = x_prev
        return x

    def _shape(self, n_or_shape: int | Sequence[int]) -> tuple[int, ...]:
        if isinstance(n_or_shape, int):
            if self.data_shape is None:
                raise ValueError("sample(n) needs data_shape=... at construction; or pass a full shape (n, ...)")
            return (n_or_shape, *self.data_shape)
        return tuple(n_or_shape)

    def elbo_bpd(
        self,
        x0: Tensor,
        *,
        batch_size: int = 256,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> DatasetELBO:
        """Negative ELBO of a dataset ``(N, ...)`` in bits/dim, with per-step terms for plotting."""
        batches = x0.split(batch_size)
        kw = dict(prediction=self.prediction, variance=self.variance, decoder=self.decoder, clip_x0=self.clip_x0)
        return elbo_bpd(self.model, batches, self.schedule, progress=progress, generator=generator, **kw)
