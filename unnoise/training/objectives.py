"""Training objectives: what one batch costs, for any modality, under either objective of a run.

An objective is called as ``objective(model, x, cond, draws) -> scalar`` by the training loop. It
(1) drops the condition to the null condition with probability ``p_uncond`` (classifier-free
guidance), (2) lets the modality ``encode`` the batch (x0, the network, extra loss terms such as
Diffusion-LM's rounding), (3) draws a noise level and the noise from ``draws`` and (4) returns the
mean of the diffusion loss plus the modality's terms:

- :class:`DDPMObjective`: t from the uniform or loss-aware sampler, :func:`unnoise.losses.diffusion_loss`
  (simple / hybrid / vlb, min-SNR), importance-weighted;
- :class:`EDMObjective`: ln sigma ~ N(P_mean, P_std^2), :func:`unnoise.losses.edm_loss` on the
  :class:`unnoise.denoisers.EDMPrecond` of the network.

The network runs under bf16 autocast when ``cfg.bf16``; the loss arithmetic stays in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from unnoise.denoisers import EDMPrecond
from unnoise.diffusion import reverse_table
from unnoise.losses import LossAwareSampler, UniformSampler, diffusion_loss, edm_loss
from unnoise.schedules import make_schedule
from unnoise.training import distributed
from unnoise.training.config import TrainConfig
from unnoise.training.distributed import Draws

Net = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # net(x, t or c_noise, cond)


class Encoded(NamedTuple):
    """A batch as the diffusion sees it: ``x0`` (B, C, ...), channels on dim 1 (where a learned
    variance doubles them), the network ``net(x, t, cond)`` that denoises it, and the modality's
    own loss terms ``extra`` (B,) (text: Diffusion-LM's rounding term), added to whichever
    diffusion loss the run trains."""

    x0: Tensor
    net: Net
    extra: Tensor | None = None


Encode = Callable[[nn.Module, Tensor], Encoded]


def autocast(net: Net, enabled: bool) -> Net:
    """``net`` under bf16 autocast (when ``enabled``), its output cast back to the input's dtype."""
    if not enabled:
        return net

    def run(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = net(x, t, cond)
        return out.to(x.dtype)

    return run


class _Objective:
    def __init__(self, cfg: TrainConfig, encode: Encode, null: Tensor | None) -> None:
        self.cfg, self.encode, self.null = cfg, encode, null

    def condition(self, cond: Tensor, draws: Draws) -> Tensor | None:
        """The batch's condition, each row dropped to the null condition with probability p_uncond."""
        if self.null is None:
            return None
        if self.cfg.p_uncond > 0:
            drop = (draws.rand() < self.cfg.p_uncond).to(cond.device)
            null = self.null.to(cond.device).expand_as(cond)
            cond = torch.where(drop.reshape(-1, *([1] * (cond.ndim - 1))), null, cond)
        return cond

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        pass

    def _total(self, loss: Tensor, extra: Tensor | None) -> Tensor:
        return (loss if extra is None else loss + extra).mean()


class DDPMObjective(_Objective):
    """The DDPM family (Ho et al. 2020; Nichol & Dhariwal 2021) at discrete steps t of the run's schedule.

    The loss-aware sampler learns from the losses of the whole global batch (gathered from every
    process), so its state is the same on every rank; ``state_dict`` carries it through checkpoints.
    """

    def __init__(self, cfg: TrainConfig, encode: Encode, null: Tensor | None) -> None:
        super().__init__(cfg, encode, null)
        self.table = reverse_table(make_schedule(cfg.schedule, cfg.T))
        self.sampler = (LossAwareSampler if cfg.timestep_sampling == "loss_aware" else UniformSampler)(cfg.T)

    def __call__(self, model: nn.Module, x: Tensor, cond: Tensor, draws: Draws) -> Tensor:
        cfg = self.cfg
        cond = self.condition(cond, draws)
        x0, net, extra = self.encode(model, x)
        t, weights = (draws.keep(v).to(x0.device) for v in self.sampler.sample(draws.batch, draws.generator))
        noise = draws.randn(*x0.shape[1:], dtype=x0.dtype).to(x0.device)
        net = autocast(net, cfg.bf16)
        terms = diffusion_loss(
            lambda x_t, tt: net(x_t, tt, cond),
            x0,
            t,
            noise,
            self.table,
            prediction=cfg.prediction,
            variance=cfg.variance,
            kind="simple" if cfg.loss == "min_snr" else cfg.loss,  # min-SNR: L_simple, weighted
            min_snr_gamma=cfg.min_snr_gamma,
        )
        if isinstance(self.sampler, LossAwareSampler):
            self.sampler.update(distributed.gather_rows(t).cpu(), distributed.gather_rows(terms.loss.detach()).cpu())
        return self._total(terms.loss * weights.to(terms.loss), extra)

    def state_dict(self) -> dict[str, Tensor]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sampler.load_state_dict(state)


class EDMObjective(_Objective):
    """EDM (Karras et al. 2022, Table 1): ln sigma ~ N(P_mean, P_std^2), D = EDMPrecond(F, sigma_data),
    loss lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2."""

    def __call__(self, model: nn.Module, x: Tensor, cond: Tensor, draws: Draws) -> Tensor:
        cfg = self.cfg
        cond = self.condition(cond, draws)
        x0, net, extra = self.encode(model, x)
        sigma = (cfg.P_mean + cfg.P_std * draws.randn(dtype=x0.dtype)).exp().to(x0.device)
        noise = draws.randn(*x0.shape[1:], dtype=x0.dtype).to(x0.device)
        net = autocast(net, cfg.bf16)
        D = EDMPrecond(lambda x_in, c_noise: net(x_in, c_noise, cond), cfg.sigma_data)
        return self._total(edm_loss(D, x0, sigma, noise, cfg.sigma_data), extra)


def make_objective(cfg: TrainConfig, encode: Encode, null: Tensor | None) -> _Objective:
    """The run's objective; ``null`` is the null condition (None: the data is unconditional)."""
    return (DDPMObjective if cfg.objective == "ddpm" else EDMObjective)(cfg, encode, null)
