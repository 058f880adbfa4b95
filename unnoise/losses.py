"""Training losses, each a small function of (network or denoiser, x0, noise level, noise), per sample.

- the DDPM family at discrete steps t (Ho et al. 2020; Nichol & Dhariwal 2021): L_simple with an
  eps / x0 / v target, min-SNR weighting, iDDPM's hybrid and the full L_vlb (terms from
  :mod:`unnoise.elbo`, so the training bound is the bits/dim one);
- EDM's objective in sigma-space (Karras et al. 2022): a denoiser ``D(x, sigma)``, x = x0 + sigma n,
  weighted by lambda(sigma);
- which t to train on: uniform or loss-aware (iDDPM importance sampling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from unnoise.diffusion import (
    PREDICTIONS,
    Prediction,
    ReverseTable,
    Variance,
    check_finite,
    expand,
    mean_flat,
    p_mean_variance,
    q_sample,
    v_from_x0_eps,
)
from unnoise.elbo import Decoder, Model, vlb_term_bpd

LossKind = Literal["simple", "hybrid", "vlb"]
LOSS_KINDS: tuple[str, ...] = ("simple", "hybrid", "vlb")

# ---------------------------------------------------------------------------------------------
# L_simple and its weightings
# ---------------------------------------------------------------------------------------------


def min_snr_weight(alpha_bar: Tensor, target: Prediction, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023): weight min(SNR, gamma) on ||x0 - x0_hat||^2.

    Expressed for the target's own MSE: ||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and
    ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2, so the weights are min(SNR, g) / SNR,
    min(SNR, g) and min(SNR, g) / (SNR + 1).
    """
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[target]


def simple_target(x0: Tensor, noise: Tensor, x_t: Tensor, alpha_bar: Tensor, target: Prediction) -> Tensor:
    """What the network regresses onto: eps (DDPM), x0, or v (Salimans and Ho 2022)."""
    if target == "eps":
        return noise
    if target == "x0":
        return x0
    if target == "v":
        return v_from_x0_eps(x0, noise, alpha_bar)
    raise ValueError(f"unknown target {target!r}; allowed: {', '.join(PREDICTIONS)}")


# ---------------------------------------------------------------------------------------------
# Training losses
# ---------------------------------------------------------------------------------------------


class LossTerms(NamedTuple):
    loss: Tensor  # (B,) what to minimise
    mse: Tensor  # (B,) L_simple (weighted if min-SNR)
    vb: Tensor  # (B,) L_{t-1} in bits/dim (zeros for kind="simple")


def diffusion_loss(
    model: Model,
    x0: Tensor,
    t: Tensor,
    noise: Tensor,
    table: ReverseTable,
    *,
    prediction: Prediction = "eps",
    variance: Variance = "fixed_small",
    kind: LossKind = "simple",
    hybrid_lambda: float = 1e-3,
    min_snr_gamma: float | None = None,
    decoder: Decoder = "discretized",
) -> LossTerms:
    """Per-sample training loss at steps ``t`` (``(B,)`` ints in 1..T), one model call.

    - ``simple``: ||target - output||^2 (DDPM's L_simple), optionally min-SNR-gamma weighted;
    - ``hybrid``: L_simple + lambda L_vlb (iDDPM Sec. 3.1): L_vlb, estimated by T L_{t-1}, sees the
      mean through a stop-gradient, so it trains only the learned variance;
    - ``vlb``: T L_{t-1}, gradients into mean and variance.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {kind!r}; allowed: {', '.join(LOSS_KINDS)}")
    if kind == "hybrid" and variance != "learned_range":
        raise ValueError("the hybrid loss trains a learned variance: it needs variance='learned_range'")
    if x0.shape != noise.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != data shape {tuple(x0.shape)}")
    check_finite(x0)
    ab = table.alpha_bar[t.long().cpu() - 1].to(x0)
    x_t = q_sample(x0, ab, noise)
    out = model(x_t, t.to(x0.dtype))
    pred = out.chunk(2, dim=1)[0] if variance == "learned_range" else out
    if pred.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(pred.shape)} does not match data shape {tuple(x0.shape)}")
    mse = mean_flat((simple_target(x0, noise, x_t, ab, prediction) - pred) ** 2)
    if min_snr_gamma is not None:
        mse = mse * min_snr_weight(ab, prediction, min_snr_gamma)
    if kind == "simple":
        return LossTerms(mse, mse, torch.zeros_like(mse))
    if kind == "hybrid":
        out = torch.cat([pred.detach(), out.chunk(2, dim=1)[1]], dim=1)
    step = p_mean_variance(out, x_t, t, table, prediction=prediction, variance=variance)
    vb = vlb_term_bpd(step.mean, step.log_variance, x0, x_t, t, table, decoder) * table.alpha_bar.shape[0]  # T L_{t-1}
    loss = mse + hybrid_lambda * vb if kind == "hybrid" else vb
    return LossTerms(loss, mse, vb)


def edm_loss(
    denoise: Callable[[Tensor, Tensor], Tensor], x0: Tensor, sigma: Tensor, noise: Tensor, sigma_data: float
) -> Tensor:
    """EDM's training loss (Karras et al. 2022, Eq. 2 with Table 1), per sample ``(B,)``:
    lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2 (mean over dims), lambda = (sigma^2 + sd^2) / (sigma sd)^2.

    With :class:`unnoise.denoisers.EDMPrecond`, lambda(sigma) c_out(sigma)^2 = 1: the loss is the
    plain MSE of the raw network F against its target (Eq. 8), unit-weighted at every sigma.
    ``x0``, ``noise`` (B, ...); ``sigma`` (B,) > 0.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != data shape {tuple(x0.shape)}")
    check_finite(x0)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return weight * mean_flat((denoise(x0 + expand(sigma, x0) * noise, sigma) - x0) ** 2)


# ---------------------------------------------------------------------------------------------
# Which t to train on
# ---------------------------------------------------------------------------------------------


class UniformSampler:
    """t ~ U{1..T}, weights 1."""

    def __init__(self, T: int) -> None:
        self.T = T

    def probabilities(self) -> Tensor:
        return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Returns steps ``(B,)`` in 1..T and importance weights ``1 / (T p_t)`` so E[w L_t] is unbiased."""
        p = self.probabilities()
        idx = torch.multinomial(p, batch, replacement=True, generator=generator)
        return idx + 1, 1.0 / (self.T * p[idx])

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint needs to resume the sampler exactly (nothing, for uniform sampling)."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """iDDPM Sec. 3.3: p_t proportional to sqrt(E[L_t^2]) over the last ``history`` losses per t.

    Uniform until every t has a full history; mixed with ``uniform_prob`` of the uniform
    distribution so that no step is starved.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 1e-3) -> None:
        super().__init__(T)
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(T, history, dtype=torch.float64)
        self.count = torch.zeros(T, dtype=torch.long)

    def state_dict(self) -> dict[str, Tensor]:
        return {"history": self.history.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:  # a checkpoint written before the sampler's state was saved: start it afresh
            self.history.copy_(state["history"])
            self.count.copy_(state["count"])

    def probabilities(self) -> Tensor:
        if (self.count < self.history.shape[1]).any():
            return super().probabilities()
        w = (self.history**2).mean(1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def update(self, t: Tensor, losses: Tensor) -> None:
        for ti, li in zip(t.long().tolist(), losses.detach().double().cpu().tolist(), strict=True):
            row, n = ti - 1, self.history.shape[1]
            if self.count[row] < n:
                self.history[row, self.count[row]] = li
            else:
                self.history[row] = torch.cat([self.history[row, 1:], torch.tensor([li], dtype=torch.float64)])
            self.count[row] += 1


__all__ = [
    "LOSS_KINDS",
    "LossAwareSampler",
    "LossKind",
    "LossTerms",
    "UniformSampler",
    "diffusion_loss",
    "edm_loss",
    "min_snr_weight",
    "simple_target",
]
