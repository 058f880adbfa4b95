"""Training losses and the variational bound of the discrete-time model, in bits per dimension.

A *model* here is the raw network ``model(x_t, t) -> output`` of a :class:`DiscreteSchedule`,
with ``t`` a float ``(B,)`` tensor of steps in 1..T and ``output`` an eps, x0 or v prediction
(twice the channels on dim 1 for a learned variance).

L_vlb = L_T + sum_{t>1} L_{t-1} + L_0 (DDPM Eq. 5):
  L_T     = KL(q(x_T | x0) || N(0, I))
  L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
  L_0     = -log p(x0 | x1)   (discretized Gaussian for 8-bit data, or a continuous Gaussian)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from unnoise.diffusion import (
    PREDICTIONS,
    Posterior,
    Prediction,
    ReverseTable,
    Variance,
    check_finite,
    discretized_gaussian_log_likelihood,
    expand,
    gaussian_log_likelihood,
    normal_kl,
    p_mean_variance,
    q_posterior,
    q_sample,
    reverse_table,
    v_from_x0_eps,
)
from unnoise.schedules import DiscreteSchedule

Model = Callable[[Tensor, Tensor], Tensor]
Decoder = Literal["discretized", "gaussian"]
LossKind = Literal["simple", "hybrid", "vlb"]
LOSS_KINDS: tuple[str, ...] = ("simple", "hybrid", "vlb")
DECODERS: tuple[str, ...] = ("discretized", "gaussian")
LN2 = math.log(2.0)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


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
# The variational bound, term by term (bits/dim)
# ---------------------------------------------------------------------------------------------


def prior_bpd(x0: Tensor, alpha_bar_T: Tensor | float) -> Tensor:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim, ``(B,)``."""
    ab = expand(torch.as_tensor(alpha_bar_T, dtype=x0.dtype), x0)
    mean, log_var = ab.sqrt() * x0, torch.log1p(-ab) + torch.zeros_like(x0)
    return mean_flat(normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))) / LN2


def vlb_term_bpd(
    mean: Tensor,
    log_var: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    table: ReverseTable,
    decoder: Decoder = "discretized",
) -> Tensor:
    """L_{t-1} in bits/dim, ``(B,)``: KL to the true posterior for t > 1, decoder NLL for t = 1."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; allowed: {', '.join(DECODERS)}")
    idx = t.long().cpu() - 1
    q_mean, q_var = q_posterior(x0, x_t, Posterior(*(c[idx] for c in table.posterior)))
    # beta_tilde_1 = 0: the t = 1 KL is never used, so any finite stand-in avoids log(0).
    q_log_var = torch.where(q_var > 0, q_var, torch.ones_like(q_var)).log().to(x0.dtype)
    kl = mean_flat(normal_kl(q_mean, q_log_var, mean, log_var)) / LN2
    if decoder == "discretized":
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
    else:
        nll = -gaussian_log_likelihood(x0, mean, log_var)
    return torch.where(t.long() == 1, mean_flat(nll) / LN2, kl)


class ELBO(NamedTuple):
    """Negative ELBO per sample in bits/dim: ``bpd = prior + terms.sum(1)``."""

    bpd: Tensor  # (B,)
    terms: Tensor  # (B, T): terms[:, t - 1] = L_{t-1} (t = 1 is the decoder term L_0)
    prior: Tensor  # (B,): L_T


@torch.no_grad()
def elbo_terms(
    model: Model,
    x0: Tensor,
    schedule: DiscreteSchedule,
    *,
    prediction: Prediction = "eps",
    variance: Variance = "fixed_small",
    decoder: Decoder = "discretized",
    clip_x0: bool = False,
    noise_fn: Callable[[int, Tensor], Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> ELBO:
    """Every term of the bound for a batch ``x0`` of shape ``(B, ...)`` (Ho et al. 2020, Eq. 5).

    One model call per t. ``noise_fn(t, x0)`` may supply the eps used for x_t (common random
    numbers, quadrature); by default it is standard normal from ``generator``.
    """
    check_finite(x0)
    table = reverse_table(schedule)
    B = x0.shape[0]
    terms = x0.new_empty(B, schedule.T)
    for t_int in range(schedule.T, 0, -1):
        noise = noise_fn(t_int, x0) if noise_fn is not None else _randn_like(x0, generator)
        t = torch.full((B,), t_int, dtype=torch.long, device=x0.device)
        x_t = q_sample(x0, table.alpha_bar[t_int - 1].to(x0.dtype), noise)
        out = model(x_t, t.to(x0.dtype))
        step = p_mean_variance(out, x_t, t, table, prediction=prediction, variance=variance, clip_x0=clip_x0)
        terms[:, t_int - 1] = vlb_term_bpd(step.mean, step.log_variance, x0, x_t, t, table, decoder)
    prior = prior_bpd(x0, schedule.alpha_bar[-1])
    return ELBO(prior + terms.sum(1), terms, prior)


class DatasetELBO(NamedTuple):
    bpd: float  # mean negative ELBO, bits/dim
    stderr: float  # standard error of that mean over samples
    terms: Tensor  # (T,) mean L_{t-1}, for plotting
    prior: float  # mean L_T


def elbo_bpd(
    model: Model,
    batches: Iterable[Tensor],
    schedule: DiscreteSchedule,
    *,
    progress: bool = False,
    **kwargs,
) -> DatasetELBO:
    """The negative ELBO of a dataset in bits/dim, batched; ``kwargs`` go to :func:`elbo_terms`."""
    bpd, terms, prior = [], [], []
    for x0 in _maybe_progress(batches, progress, "ELBO"):
        e = elbo_terms(model, x0, schedule, **kwargs)
        bpd.append(e.bpd.double().cpu())
        terms.append(e.terms.double().sum(0).cpu())
        prior.append(e.prior.double().cpu())
    if not bpd:
        raise ValueError("no data: the dataset for the ELBO is empty")
    all_bpd, n = torch.cat(bpd), sum(b.numel() for b in bpd)
    stderr = all_bpd.std().item() / math.sqrt(n) if n > 1 else float("nan")
    return DatasetELBO(all_bpd.mean().item(), stderr, torch.stack(terms).sum(0) / n, torch.cat(prior).mean().item())


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _maybe_progress(it, progress: bool, desc: str):
    if not progress:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, leave=False)


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
    "ELBO",
    "DatasetELBO",
    "LossAwareSampler",
    "LossTerms",
    "UniformSampler",
    "diffusion_loss",
    "elbo_bpd",
    "elbo_terms",
    "mean_flat",
    "min_snr_weight",
    "prior_bpd",
    "vlb_term_bpd",
]
