"""Runs of any modality, written once: settings -> config, train, load, and the run's denoiser.

``train(name, cfg, run_dir)`` is the whole training pipeline (the modality's data and network,
the run's objective, the generic loop); ``load_run(run_dir)`` reads any run folder back (this
version's or an earlier one's) into a :class:`Run`, whose :meth:`Run.denoiser` is the trained
network as a sigma-space denoiser under the run's objective, classifier-free guided on request.
Two EDM2 features enter here, so that every modality's sampling gets them through that one
denoiser: ``load_run(..., ema_profile=sigma_rel)`` loads weights reconstructed by post-hoc EMA,
and :meth:`Run.autoguided` guides the run with a weaker run of the same task (autoguidance).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from unnoise.denoisers import EDMPrecond, bf16_autocast, from_discrete, native_bf16
from unnoise.guidance import autoguidance, conditioned
from unnoise.modalities.base import Modality, get_modality, modality_of
from unnoise.schedules import DiscreteSchedule, make_schedule
from unnoise.training import integrity, loop, runfolder
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
    with torch.no_grad():  # the data's scale: EDM's sigma_data if unset, and the tuned sampling grid's centre
        cfg.extra["data_std"] = round(modality.encode(model, data.x[:4096]).x0.double().std().item(), 6)
    if cfg.objective == "edm" and cfg.sigma_data is None:
        cfg.sigma_data = cfg.extra["data_std"]
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
        network=_called_module(modality.network(model), model),
    )


def _called_module(network, model: nn.Module) -> nn.Module:
    """The module the objective's calls run through (what ``--compile`` compiles): the modality's
    network, or the model itself where the network is a function of it (toy: ``model(x, t)``)."""
    return network if isinstance(network, nn.Module) else model


@dataclass
class Run:
    """A trained run: its modality, settings, the model (EMA weights unless asked otherwise) and folder."""

    modality: Modality
    cfg: TrainConfig
    model: nn.Module
    config: dict[str, Any] = field(default_factory=dict)  # the whole config.json
    path: Path | None = None
    weights: str = "ema"  # which weights the model holds, in words (ema, model, or the post-hoc EMA profile)
    guide: tuple[Run, float] | None = None  # autoguidance: the bad run and the scale (:meth:`autoguided`)
    guide_uses: int = field(default=0, compare=False, repr=False)  # denoisers made with the guide

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
        classifier-free guided with scale ``guidance`` (1: plain conditional); autoguided if the run
        is :meth:`autoguided`, with the bad run at the same condition and classifier-free guidance:
        D = CFG_bad + w (CFG_good - CFG_bad) (:func:`unnoise.guidance.autoguidance`)."""
        D = self._denoiser(cond, null, guidance, bf16)
        if self.guide is not None:
            bad, scale = self.guide
            self.guide_uses += 1
            D = autoguidance(D, bad._denoiser(cond, null, guidance, bf16), scale)
        D.sigma_data = self.data_std  # the samplers' tuned grid is centred on it (None: their default)
        return D

    @property
    def data_std(self) -> float | None:
        """The standard deviation of the encoded training data (runs before it was recorded: EDM's
        sigma_data, else None)."""
        std = self.cfg.extra.get("data_std", self.cfg.sigma_data if self.cfg.objective == "edm" else None)
        return None if std is None else float(std)

    def autoguided(self, bad: Run, scale: float) -> Run:
        """This run guided by ``bad``, a weaker run of the same task (smaller, or trained less), with
        scale w (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"; EDM2's
        tuned w are 1.7 to 2.9): a copy whose every denoiser is D_bad + w (D_self - D_bad).

        ``bad`` must be of the same modality, data, conditioning and sample shape (its objective may
        differ: both are sigma-space denoisers); text runs are refused, as each diffuses in word
        embeddings it learned itself."""
        scale = float(scale)
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"the autoguidance scale must be a finite number >= 0 (1: no guidance), got {scale}")
        where = bad.path or "the guiding run"
        if bad.name != self.name:
            raise ValueError(
                f"{where} is a run of modality {bad.name}; this run is of {self.name}: autoguidance needs the same"
            )
        if self.name in LEARNED_SPACES:
            raise ValueError(f"{self.name} runs cannot be autoguided: {LEARNED_SPACES[self.name]}")
        mine, theirs = self.modality.sample_shape(self), bad.modality.sample_shape(bad)
        if tuple(mine) != tuple(theirs):
            raise ValueError(f"{where} draws samples of shape {tuple(theirs)}; this run's are {tuple(mine)}")
        for name in ("data", "conditional"):
            a, b = getattr(self.cfg, name), getattr(bad.cfg, name)
            if a != b:
                raise ValueError(
                    f"{where} was trained with {name} {b!r}, this run with {a!r}: autoguidance needs both the same"
                )
        return dataclasses.replace(self, guide=(bad, scale), guide_uses=0)

    def _denoiser(self, cond: Tensor | None, null: Tensor | None, guidance: float, bf16: bool | None) -> Denoiser:
        """:meth:`denoiser` without autoguidance."""
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


# Modalities whose diffusion space is learned by each run, so that two runs' denoisers do not
# speak the same space (a reason for each, for the refusal).
LEARNED_SPACES: dict[str, str] = {
    "text": "each text run diffuses in word embeddings it learned itself",
    "text2image": "each text2image run diffuses in the latents of its own VAE, with its own prompt vocabulary",
}


def load_run(
    run_dir: str | Path, which: str = "ema", expect: str | None = None, *, ema_profile: float | None = None
) -> Run:
    """A run folder of any modality with its EMA (or ``which="model"``: raw) weights, ready to sample.

    ``expect`` names the modality the caller needs (one line if the run is another).
    ``ema_profile=sigma_rel``: the weights of a power-function EMA of that relative width at the
    run's last snapshot, reconstructed from its post-hoc EMA snapshots
    (:func:`unnoise.training.posthoc_ema.reconstruct`; the run must have been trained with
    ``posthoc_ema``)."""
    if ema_profile is not None and which != "ema":
        raise ValueError(f"ema_profile reconstructs EMA weights; it does not combine with which={which!r}")
    config = load_config(run_dir)
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        raise ValueError(f"{Path(run_dir) / 'config.json'} is not a run's config (no 'train' section)")
    name = modality_of(config)
    if name == "vae":  # an autoencoder for text2image runs (unnoise train vae), not a diffusion
        raise ValueError(f"{run_dir} is a VAE run: it encodes images for text2image runs (--vae); it does not sample")
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
    weights = which
    if ema_profile is not None:
        weights = _load_ema_profile(Path(run_dir), model, ema_profile)
    return getattr(modality, "run_type", Run)(modality, cfg, model.eval(), config, Path(run_dir), weights)


def _load_ema_profile(run_dir: Path, model: nn.Module, sigma_rel: float) -> str:
    """Load post-hoc EMA weights of width ``sigma_rel`` into ``model``; returns what was loaded, in words."""
    from unnoise.training.posthoc_ema import check_sigma_rel, describe, find_snapshots, reconstruct

    sigma_rel = check_sigma_rel(sigma_rel, "the EMA profile's sigma_rel")
    snapshots = find_snapshots(run_dir)
    if not snapshots:
        raise ValueError(
            f'{run_dir} has no post-hoc EMA snapshots: train it with posthoc_ema (e.g. "posthoc_ema": [0.05, 0.1] '
            "in --config) to choose an EMA profile after training"
        )
    weights = reconstruct(snapshots, sigma_rel)
    expected = model.state_dict()
    if weights.keys() != expected.keys() or any(weights[k].shape != v.shape for k, v in expected.items()):
        raise ValueError(f"{run_dir}: its post-hoc EMA snapshots do not fit the run's network")
    integrity.check_finite(weights, f"{run_dir}: the post-hoc EMA weights")
    model.load_state_dict(weights)
    last = max(s.step for s in snapshots)
    return f"post-hoc EMA sigma_rel {sigma_rel:g} at step {last} from {describe(snapshots)}"
