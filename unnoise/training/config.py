"""The training settings of a run (``TrainConfig``), validated, saved as its config.json.

Two objectives share one trainer: ``"ddpm"`` (a discrete-time VP process: a noise schedule of T
steps, eps / x0 / v prediction, the simple / hybrid / vlb / min-SNR losses, uniform or loss-aware
timestep sampling, exact bits/dim) and ``"edm"`` (Karras et al. 2022: a preconditioned network,
log-normal noise levels, EDM's weighting). Settings of the other objective are refused, and the
saved config holds only what was applied (``None`` for what the objective does not use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from unnoise.schedules import SCHEDULE_NAMES
from unnoise.schema import from_dict

OBJECTIVES: tuple[str, ...] = ("ddpm", "edm")
LOSSES: tuple[str, ...] = ("simple", "hybrid", "vlb", "min_snr")
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")
TIMESTEP_SAMPLING: tuple[str, ...] = ("uniform", "loss_aware")

# What each objective fills in when a setting is left unset (None).
DDPM_DEFAULTS: dict[str, Any] = {
    "T": 1000,
    "schedule": "cosine",
    "prediction": "eps",
    "loss": "simple",
    "timestep_sampling": "uniform",
}
# EDM, Karras et al. (2022) Table 1: training noise ln(sigma) ~ N(P_mean, P_std^2); sampling range.
EDM_DEFAULTS: dict[str, Any] = {"P_mean": -1.2, "P_std": 1.2, "sigma_min": 0.002, "sigma_max": 80.0}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as the run folder's config.json."""

    data: str = "digits"  # image: digits | fashion-mnist | a folder; text: tiny | e2e | a file; ...
    image_size: int | None = None  # image folders only
    model: str = "small"  # a network preset of the modality
    conditional: bool = True  # class labels / conditions with a null condition (classifier-free guidance)
    p_uncond: float = 0.1  # probability of training on the null condition
    objective: Literal["ddpm", "edm"] = "ddpm"
    # ddpm only (None under edm)
    T: int | None = None
    schedule: str | None = None
    prediction: Literal["eps", "x0", "v"] | None = None
    loss: Literal["simple", "hybrid", "vlb", "min_snr"] | None = None
    min_snr_gamma: float | None = None  # loss="min_snr" only (default 5)
    timestep_sampling: Literal["uniform", "loss_aware"] | None = None
    # edm only (None under ddpm); sigma_data None: the training data's standard deviation
    sigma_data: float | None = None
    P_mean: float | None = None
    P_std: float | None = None
    sigma_min: float | None = None
    sigma_max: float | None = None
    steps: int = 2000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 100
    lr_decay: Literal["constant", "cosine"] = "constant"  # after warm-up; cosine reaches 0 at `steps`
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # post-hoc EMA (Karras et al. 2024, EDM2, Sec. 3): the sigma_rel of each power-function EMA to
    # track (EDM2: [0.05, 0.1]; empty: off) and the steps between their snapshots (default steps // 20)
    posthoc_ema: list[float] = field(default_factory=list)
    posthoc_snapshot_every: int | None = None
    bf16: bool = False
    # torch.compile the network for the training steps (inductor): faster steps after a one-time
    # compile of about a minute on a CPU; the saved weights and the EMA are those of the plain network
    compile: bool = False
    seed: int = 0
    log_every: int = 25
    save_every: int = 500
    keep: int = 3
    extra: dict = field(default_factory=dict)  # modality-specific settings (network size, vocabulary, ...)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "keep", "log_every", "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond must lie in [0, 1), got {self.p_uncond}")
        _choose("objective", self.objective, OBJECTIVES)
        _choose("lr_decay", self.lr_decay, ("constant", "cosine"))
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not 0 < self.lr < float("inf") or not 0 < self.grad_clip < float("inf"):  # also refuses NaN
            raise ValueError(f"lr and grad_clip must be finite and > 0, got {self.lr}, {self.grad_clip}")
        if not 0 <= self.weight_decay < float("inf") or int(self.warmup) < 0:
            raise ValueError(f"weight_decay and warmup must be >= 0, got {self.weight_decay}, {self.warmup}")
        self._check_posthoc_ema()
        if self.objective == "ddpm":
            self._resolve(DDPM_DEFAULTS, EDM_DEFAULTS | {"sigma_data": None})
            _choose("loss", self.loss, LOSSES)
            _choose("prediction", self.prediction, PREDICTIONS)
            _choose("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLING)
            _choose("schedule", self.schedule, SCHEDULE_NAMES)
            if int(self.T) < 2:
                raise ValueError(f"T must be >= 2, got {self.T}")
            if self.loss == "min_snr":
                self.min_snr_gamma = 5.0 if self.min_snr_gamma is None else self.min_snr_gamma
                if not self.min_snr_gamma > 0:
                    raise ValueError(f"min_snr_gamma must be > 0, got {self.min_snr_gamma}")
            elif self.min_snr_gamma not in (None, 5.0):  # 5.0: the default saved by earlier versions
                raise ValueError(f"min_snr_gamma applies to loss='min_snr', not to loss={self.loss!r}")
            else:
                self.min_snr_gamma = None
        else:
            self._resolve(EDM_DEFAULTS, DDPM_DEFAULTS | {"min_snr_gamma": None})
            if self.sigma_data is not None and not self.sigma_data > 0:
                raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
            if not 0 < self.sigma_min < self.sigma_max:
                raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
            if not self.P_std > 0:
                raise ValueError(f"P_std must be > 0, got {self.P_std}")

    def _check_posthoc_ema(self) -> None:
        """Each sigma_rel in (0, 12^-1/2) and distinct; the snapshot interval applies only with them."""
        from unnoise.training.posthoc_ema import check_sigma_rel

        self.posthoc_ema = [check_sigma_rel(s, "posthoc_ema: each sigma_rel") for s in self.posthoc_ema]
        if len(set(self.posthoc_ema)) != len(self.posthoc_ema):
            raise ValueError(f"posthoc_ema lists a sigma_rel twice: {self.posthoc_ema}")
        if not self.posthoc_ema:
            if self.posthoc_snapshot_every is not None:
                raise ValueError(
                    "posthoc_snapshot_every applies with posthoc_ema (a list of sigma_rels, e.g. [0.05, 0.1])"
                )
            return
        if self.posthoc_snapshot_every is None:  # about 20 snapshots a run: EDM2's fits need a dozen or more
            self.posthoc_snapshot_every = max(1, int(self.steps) // 20)
        if int(self.posthoc_snapshot_every) < 1:
            raise ValueError(f"posthoc_snapshot_every must be >= 1, got {self.posthoc_snapshot_every}")

    def _resolve(self, own: dict[str, Any], other: dict[str, Any]) -> None:
        """Fill this objective's unset settings; refuse any setting of the other objective."""
        given = [name for name in other if getattr(self, name) is not None]
        if given:
            which = "edm" if self.objective == "ddpm" else "ddpm"
            raise ValueError(
                f"{', '.join(given)} apply to objective {which!r}, not {self.objective!r} "
                f"({self.objective} settings: {', '.join(own)})"
            )
        for name, value in own.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def variance(self) -> str:
        """The reverse process's variance: learned (iDDPM) for the losses that train it."""
        return "learned_range" if self.loss in ("hybrid", "vlb") else "fixed_small"

    @property
    def learned_variance(self) -> bool:
        return self.variance == "learned_range"

    @classmethod
    def from_dict(cls, settings: Any, where: str = "settings") -> TrainConfig:
        """A config from a dict (a --config file, a run's config.json): unknown keys and values of the
        wrong type are refused in one line naming ``where`` and the key (:func:`unnoise.schema.from_dict`)."""
        return from_dict(cls, settings, where)


def _choose(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
