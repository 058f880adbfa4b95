"""The variational bound of the discrete-time model, term by term, in bits per dimension.

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
    Posterior,
    Prediction,
    ReverseTable,
    Variance,
    check_finite,
    discretized_gaussian_log_likelihood,
    expand,
    gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    p_mean_variance,
    q_posterior,
    q_sample,
    reverse_table,
)
from unnoise.schedules import DiscreteSchedule

Model = Callable[[Tensor, Tensor], Tensor]
Decoder = Literal["discretized", "gaussian"]
DECODERS: tuple[str, ...] = ("discretized", "gaussian")
LN2 = math.log(2.0)


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
    first = (t.long() == 1).to(kl.device)
    if not first.any():
        return kl
    # The decoder term only on the rows with t = 1: at higher t its log-CDF differences underflow
    # to log(0), and torch.where would still send their NaN gradients into the network.
    m, lv, x = mean[first], log_var[first], x0[first]
    if decoder == "discretized":
        nll = -discretized_gaussian_log_likelihood(x, m, 0.5 * lv)
    else:
        nll = -gaussian_log_likelihood(x, m, lv)
    return kl.masked_scatter(first, mean_flat(nll).to(kl.dtype) / LN2)


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


__all__ = ["DECODERS", "ELBO", "DatasetELBO", "Decoder", "Model", "elbo_bpd", "elbo_terms", "prior_bpd", "vlb_term_bpd"]
