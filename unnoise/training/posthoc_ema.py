"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion
models", EDM2, Sec. 3 and App. C): choose the EMA length after training, from saved snapshots.

A **power-function EMA** of exponent gamma averages the trajectory theta(tau) of the weights over
[0, t] with the density p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) (Eq. 121): its width grows
with t, so it is described by one number, the **relative standard deviation** sigma_rel of that
density over t (Eq. 123), e.g. 0.05 to 0.2. It is tracked step by step with
``theta_hat_t = beta_t theta_hat_(t-1) + (1 - beta_t) theta_t``, ``beta_t = (1 - 1/t)^(gamma + 1)``
(Eq. 127 with one step as the time unit), which unrolls to the exact discrete weights
``w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)`` for tau = 1..t (:func:`power_weights`):
the density p_t integrated over (tau - 1, tau], with theta constant within a step.

Training keeps one or two such EMAs (``TrainConfig.posthoc_ema``: their sigma_rels) and saves
them every ``posthoc_snapshot_every`` steps (:func:`unnoise.training.loop.train`). Any other
profile (t, sigma_rel) is then approximated by the linear combination of snapshots whose weight
density is closest to the target's in L2 over tau (App. C, Algorithm 3): solve A x = b with
A_ij = <p_i, p_j> and b_i = <p_i, p_target> (closed form, Eq. 151), normalise x to sum to 1,
and average the snapshots' weights with x (:func:`reconstruct`). Times are optimizer steps
here (EDM2 counts images; with a constant batch the profiles are the same).

Layout in a run folder: every checkpoint holds ``power_ema_<k>.safetensors`` (the k-th EMA, needed
to resume exactly); a checkpoint that is a snapshot also holds ``snapshot.json``
(``{"format", "step", "sigma_rel": {file stem: sigma_rel}}``), is covered by the step folder's
SHA-256 manifest like every other file, and is never pruned by ``keep``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from unnoise.training import integrity
from unnoise.training.checkpoint import SNAPSHOT
from unnoise.training.files import read_json, read_safetensors

FORMAT = "unnoise-phema/1"
# gamma = 0 (a uniform average over the whole run) has sigma_rel = sqrt(1 / 12); longer averages
# would need gamma < 0, which puts most weight on the start of training (and sigma_rel is not
# one-to-one there), so sigma_rel must lie in (0, 12^-1/2).
SIGMA_REL_MAX = 12**-0.5


def check_sigma_rel(sigma_rel: float, what: str = "sigma_rel") -> float:
    """``sigma_rel`` as a float, or one line saying what is allowed."""
    try:
        s = float(sigma_rel)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel!r}") from None
    if not 0 < s < SIGMA_REL_MAX:  # also refuses NaN
        raise ValueError(
            f"{what} must lie in (0, {SIGMA_REL_MAX:.4f}) (the power EMA's relative width; EDM2 tracks 0.05 and 0.1), "
            f"got {sigma_rel}"
        )
    return s


def gamma_to_sigma_rel(gamma: float) -> float:
    """Eq. 123: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))), the standard deviation of
    the density (gamma + 1) tau^gamma on [0, 1]."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Eq. 126 and Algorithm 2: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (Eq. 123 squared and
    multiplied out); it is > 0 for sigma_rel in (0, 12^-1/2)."""
    s = check_sigma_rel(sigma_rel)
    c = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - c, 12.0 - c])
    return float(roots[np.abs(roots.imag) < 1e-9 * max(1.0, c)].real.max())


def power_beta(gamma: float, t: int) -> float:
    """Eq. 127 with one step as the time unit: the decay for the update that makes step ``t`` (>= 1)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_weights(gamma: float, t: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The weight each step tau = 1..t has in the power EMA at step t, ``(t,)``: unrolling Eq. 127,
    prod_{s > tau} beta_s = (tau / t)^(gamma + 1), so w_tau = (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)."""
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    e = gamma + 1.0
    return ((tau / t) ** e - ((tau - 1) / t) ** e).to(dtype)


class PowerEMA:
    """Power-function EMAs of a network's parameters, one per sigma_rel (EDM2's ``PowerFunctionEMA``).

    ``update(net, t)`` after the optimizer step that makes step t (1 at the first); buffers are
    copied, as for the ordinary EMA. ``modules`` names each EMA by its file stem in a checkpoint.
    """

    def __init__(self, net: nn.Module, sigma_rels: Sequence[float]) -> None:
        self.sigma_rels = [check_sigma_rel(s, "posthoc_ema") for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.emas = [copy.deepcopy(net).requires_grad_(False) for _ in self.sigma_rels]

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {f"power_ema_{k}": ema for k, ema in enumerate(self.emas)}

    def snapshot_meta(self, step: int) -> dict:
        """What ``snapshot.json`` records: the step and each file's sigma_rel."""
        return {"format": FORMAT, "step": step, "sigma_rel": dict(zip(self.modules, self.sigma_rels, strict=True))}

    @torch.no_grad()
    def update(self, net: nn.Module, t: int) -> None:
        if t < 1:
            raise ValueError(f"power EMA steps count from 1, got {t}")
        for gamma, ema in zip(self.gammas, self.emas, strict=True):
            beta = power_beta(gamma, t)
            for e, p in zip(ema.parameters(), net.parameters(), strict=True):
                e.lerp_(p.detach(), 1.0 - beta)
            for e, b in zip(ema.buffers(), net.buffers(), strict=True):
                e.copy_(b)


@dataclass(frozen=True)
class Snapshot:
    """A power EMA of width ``sigma_rel`` as it was at ``step``: its weights, in memory or a .safetensors file."""

    step: int
    sigma_rel: float
    weights: Mapping[str, Tensor] | Path

    def load(self) -> Mapping[str, Tensor]:
        return read_safetensors(self.weights) if isinstance(self.weights, Path) else self.weights


def profile_inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """Eq. 151 / Algorithm 3: <p_a, p_b> = int_0^min(t_a, t_b) p_a(tau) p_b(tau) dtau of two power
    densities p(tau) = (g + 1) tau^g / t^(g + 1); = (g_a + 1)(g_b + 1) / (g_a + g_b + 1) * t_a^g_b / t_b^(g_b + 1)
    when t_a <= t_b (and symmetrically), written with ratios <= 1 so that large gammas cannot overflow."""
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * ratio**exponent / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(
    steps: Sequence[int], sigma_rels: Sequence[float], target_step: int, target_sigma_rel: float
) -> np.ndarray:
    """Algorithm 3: the weights x (summing to 1) of the snapshots whose combined density is the
    least-squares fit of the target's, from the normal equations A x = b (EDM2's
    ``solve_posthoc_coefficients``); ``(len(steps),)`` float64."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels], dtype=np.float64)
    g_target = sigma_rel_to_gamma(target_sigma_rel)
    A = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner_products(t, g, np.float64(target_step), np.float64(g_target))
    # lstsq, not solve: two snapshots of (nearly) the same profile make A singular; the minimum-norm
    # solution is then still a least-squares fit.
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    return x / x.sum()  # the fit's mass is ~1; exactly 1 keeps a constant trajectory unchanged (as EDM2)


def reconstruct(snapshots: Sequence[Snapshot], target_sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    """The weights of a power EMA of width ``target_sigma_rel`` at ``step`` (default: the last snapshot's),
    as the least-squares combination of the snapshots taken up to then (App. C, Algorithm 3).

    Floating tensors are combined in float64 and returned in their stored dtype; other tensors
    (integer buffers) are the latest snapshot's. Snapshots are loaded one at a time.
    """
    target_sigma_rel = check_sigma_rel(target_sigma_rel, "the target sigma_rel")
    if not snapshots:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    step = max(s.step for s in snapshots) if step is None else int(step)
    used = sorted((s for s in snapshots if 1 <= s.step <= step), key=lambda s: (s.step, s.sigma_rel))
    if not used:
        raise ValueError(
            f"no snapshot at or before step {step} (the first is at step {min(s.step for s in snapshots)})"
        )
    x = solve_coefficients([s.step for s in used], [s.sigma_rel for s in used], step, target_sigma_rel)
    total: dict[str, Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coef, snap in zip(x, used, strict=True):
        for key, value in snap.load().items():
            if not value.is_floating_point():
                total[key], dtypes[key] = value.clone(), value.dtype  # sorted by step: the latest wins
                continue
            dtypes[key] = value.dtype
            term = float(coef) * value.detach().to(torch.float64)
            total[key] = term if key not in total else total[key] + term
    return {key: value.to(dtypes[key]) for key, value in total.items()}


def find_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """The snapshots of a run folder (step folders holding ``snapshot.json``), oldest first.

    Each step folder is verified against its manifest first; a damaged one is passed over with a
    warning (the fit then uses the others), and a snapshot.json that is not one is refused."""
    found: list[Snapshot] = []
    for meta_path in sorted(Path(run_dir).glob(f"checkpoints/step_*/{SNAPSHOT}")):
        folder = meta_path.parent
        try:
            integrity.verify(folder)
        except integrity.Damaged as e:
            warnings.warn(f"{e}; post-hoc EMA uses the other snapshots", stacklevel=2)
            continue
        meta = read_json(meta_path)
        try:
            step, sigma_rels = int(meta["step"]), dict(meta["sigma_rel"])
            ok = meta.get("format") == FORMAT and folder.name == f"step_{step:08d}"
        except (KeyError, TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise ValueError(f"{meta_path} is not a post-hoc EMA snapshot record ({FORMAT})")
        for stem, sigma_rel in sigma_rels.items():
            if "/" in stem or "\\" in stem or not (folder / f"{stem}.safetensors").is_file():
                raise ValueError(f"{meta_path} names {stem!r}, which is not a file of its step folder")
            found.append(
                Snapshot(step, check_sigma_rel(sigma_rel, f"{meta_path}: sigma_rel"), folder / f"{stem}.safetensors")
            )
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def describe(snapshots: Sequence[Snapshot]) -> str:
    """``'12 snapshots of sigma_rel 0.05, 0.1 at steps 50..600'``, for messages."""
    widths = ", ".join(f"{s:g}" for s in sorted({s.sigma_rel for s in snapshots}))
    steps = sorted({s.step for s in snapshots})
    return f"{len(snapshots)} snapshots of sigma_rel {widths} at steps {steps[0]}..{steps[-1]}"


__all__ = [
    "SIGMA_REL_MAX",
    "PowerEMA",
    "Snapshot",
    "check_sigma_rel",
    "find_snapshots",
    "gamma_to_sigma_rel",
    "power_beta",
    "power_weights",
    "profile_inner_products",
    "reconstruct",
    "sigma_rel_to_gamma",
    "solve_coefficients",
]
