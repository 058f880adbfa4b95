"""Runs of any modality, written once: settings -> config, train, load, and the run's denoiser.

``train(name, cfg, run_dir)`` is the whole training pipeline (the modality's data and network,
the run's objective, the generic loop); ``load_run(run_dir)`` reads any run folder back (this
version's or an earlier one's) into a :class:`Run`, whose :meth:`Run.denoiser` is the trained
network as a sigma-space denoiser under the run's objective, classifier-free guided on request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unnoise.denoisers import EDMPrecond, bf16_autocast, from_discrete, native_bf16
from unnoise.guidance import conditioned
from unnoise.modalities.base import Modality, get_modality, modality_of
from unnoise.schedules import DiscreteSchedule, make_schedule
from unnoise.training import loop, runfolder
from unnoise.training.checkpoint import latest_checkpoint, load_config, load_model_weights
from unnoise.training.config import TrainConfig
from unnoise.training.objectives import make_objective

Denoiser = Callable[[Tensor, Tensor], Tensor]


def make_config(name: str, settings: Mapping[str, Any], where: str = "settings") -> TrainConfig:
    """The modality's defaults (those of the chosen objective included), then ``settings`` on top;
    checked by the modality, so a setting it cannot honour is refused here, before any work."""
    modality = get_modality(name)
    settings = dict(settings)
    objective = settings.get("objective", modality.defaults.get("objective", "ddpm"))
    merged = dict(modality.defaults) | (dict(modality.ddpm_defaults) if objective == "ddpm" else {})
    extra = dict(merged.get("extra", {})) | dict(settings.pop("extra", {}) or {})
    cfg = TrainConfig.from_dict(merged | settings | {"extra": extra}, where)
    modality.check(cfg)
    return cfg


def train(
    name: str,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop: Callable[[int], bool] | None = None,
) -> nn.Module:
    """Train a model of modality ``name`` on ``cfg.data``; returns the EMA model.

    Writes the run folder (config.json with what was applied, log, checkpoints); ``stop(step)``
    may end training early (:func:`unnoise.training.loop.train`, which also says what ``resume``
    and ``overwrite`` allow). Under ``objective="edm"`` an unset
    ``sigma_data`` is the standard deviation of the encoded training data, recorded in the config.
    """
    modality = get_modality(name)
    modality.check(cfg)
    runfolder.check_out(Path(run_dir), resume=resume, overwrite=overwrite)  # before loading any data
    torch.manual_seed(cfg.seed)
    cfg.extra["modality"] = modality.name
    data = modality.training_data(cfg)
    if data.cond is None:  # unlabelled data, or --unconditional: no condition to drop, none recorded
        cfg.conditional, cfg.p_uncond = False, 0.0
    model = modality.build(cfg, data)
    if cfg.objective == "edm" and cfg.sigma_data is None:
        with torch.no_grad():
            cfg.sigma_data = round(modality.encode(model, data.x[:4096]).x0.double().std().item(), 6)
    objective = make_objective(cfg, modality.encode, data.null)
    cond = data.cond if data.cond is not None else torch.zeros(len(data.x), dtype=torch.long)

    def preview(ema: nn.Module, step: int) -> None:
        modality.preview(Path(run_dir), cfg, ema, step)

    return loop.train(
        cfg,
        run_dir,
        model,
        data.x,
        cond,
        loss_fn=objective,
        resume=resume,
        overwrite=overwrite,
        on_sample=preview,
        progress=progress,
        stop=stop,
    )


@dataclass
class Run:
    """A trained run: its modality, settings, the model (EMA weights unless asked otherwise) and folder."""

    modality: Modality
    cfg: TrainConfig
    model: nn.Module
    config: dict[str, Any] = field(default_factory=dict)  # the whole config.json
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.modality.name

    @cached_property
    def schedule(self) -> DiscreteSchedule | None:
        """The discrete schedule of a DDPM-objective run (None under EDM)."""
        return make_schedule(self.cfg.schedule, self.cfg.T) if self.cfg.objective == "ddpm" else None

    @property
    def sigma_max(self) -> float:
        return float(self.schedule.sigma_max) if self.schedule is not None else float(self.cfg.sigma_max)

    @property
    def sigma_min(self) -> float:
        return float(self.schedule.sigma_min) if self.schedule is not None else float(self.cfg.sigma_min)

    @property
    def extra(self) -> dict[str, Any]:
        return self.cfg.extra

    def conditional_denoiser(self, bf16: bool | None = None) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
        """``D(x, sigma, cond)``: the network under the run's parameterization (DDPM: eps / x0 / v at
        the schedule's fractional t, the learned variance's channels dropped; EDM: Table 1's
        preconditioning). ``bf16`` runs the network under bf16 autocast (None: if it was trained so
        and this machine runs bf16 natively, :func:`unnoise.denoisers.native_bf16`)."""
        net = self.modality.network(self.model)
        if self.cfg.bf16 and native_bf16() if bf16 is None else bf16:
            net = bf16_autocast(net)
        if self.cfg.objective == "edm":
            sigma_data = float(self.cfg.sigma_data)
            return lambda x, sigma, cond: EDMPrecond(lambda x_in, c: net(x_in, c, cond), sigma_data)(x, sigma)
        schedule, prediction = self.schedule, self.cfg.prediction
        variance = "learned_range" if self.cfg.learned_variance else "fixed"

        def denoise(x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
            D = from_discrete(lambda x_t, t: net(x_t, t, cond), schedule, prediction=prediction, variance=variance)
            return D(x, sigma)

        return denoise

    def denoiser(
        self, cond: Tensor | None, null: Tensor | None, guidance: float = 1.0, bf16: bool | None = None
    ) -> Denoiser:
        """``D(x, sigma)`` given ``cond`` (None: unconditional, the null condition if the run has one),
        classifier-free guided with scale ``guidance`` (1: plain conditional)."""
        D = self.conditional_denoiser(bf16)
        if cond is None:
            if guidance != 1.0 and null is None:
                raise ValueError("this model is unconditional: guidance needs a class-conditional run (leave it at 1)")
            if guidance != 1.0:
                raise ValueError(f"guidance {guidance:g} needs a condition to guide toward (leave it at 1)")
            return lambda x, sigma: D(x, sigma, None if null is None else null.expand(x.shape[0], *null.shape))
        if null is None:
            raise ValueError("this model is unconditional: it takes no condition (train it with conditions)")
        return conditioned(D, cond, null, guidance)


def load_run(run_dir: str | Path, which: str = "ema", expect: str | None = None) -> Run:
    """A run folder of any modality with its EMA (or ``which="model"``: raw) weights, ready to sample.

    ``expect`` names the modality the caller needs (one line if the run is another)."""
    config = load_config(run_dir)
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        raise ValueError(f"{Path(run_dir) / 'config.json'} is not a run's config (no 'train' section)")
    name = modality_of(config)
    if expect is not None and name != expect:
        raise ValueError(f"{run_dir} is a {name} run, not {expect}")
    modality = get_modality(name)
    cfg = TrainConfig.from_dict(config["train"], where=str(Path(run_dir) / "config.json"))
    try:
        model = modality.load(config, cfg)
    except (KeyError, TypeError, ValueError) as e:
        detail = f"lacks {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(
            f"{Path(run_dir)}/{detail}"
            if detail.startswith("config.json")
            else f"{Path(run_dir) / 'config.json'}: the {name} network's settings: {detail}"
        ) from None
    step = latest_checkpoint(run_dir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: train first (unnoise train {name} ...)")
    load_model_weights(step, model, which=which)
    return getattr(modality, "run_type", Run)(modality, cfg, model.eval(), config, Path(run_dir))
