"""Guidance and conditioning as denoiser combinators: each takes a denoiser and returns a new one.

Sigma-space (DESIGN.md): ``x = x0 + sigma n`` and a denoiser ``D(x, sigma) -> x0_hat`` with
``sigma`` of shape ``()`` or ``(B,)``. The score is ``(D(x, sigma) - x) / sigma^2``, so anything
added to the score shows up in D multiplied by ``sigma^2``. Samplers never know they are guided.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from unnoise.diffusion import expand
from unnoise.sampling.samplers import Denoiser, Generator, randn_like

ConditionalDenoiser = Callable[[Tensor, Tensor, Tensor], Tensor]  # D(x, sigma, labels) -> x0_hat
LogProb = Callable[[Tensor, Tensor], Tensor]  # log p(y | x_sigma), (B,)


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0 (0: unguided/unconditional), got {scale}")
    return scale


def _check_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    if interval is None:
        return None
    if len(interval) != 2:
        raise ValueError(f"interval must be a pair (sigma_lo, sigma_hi), got {interval!r}")
    lo, hi = float(interval[0]), float(interval[1])
    if not (0 <= lo < hi):
        raise ValueError(f"interval needs 0 <= sigma_lo < sigma_hi (sigma_hi may be inf), got ({lo}, {hi})")
    return lo, hi


def _labels_for(labels: Tensor, batch: int, what: str) -> Tensor:
    """A ``()`` label is shared by the batch; otherwise the first dim must be the batch."""
    labels = torch.as_tensor(labels)
    if labels.ndim == 0:
        return labels.expand(batch)
    if labels.shape[0] != batch:
        raise ValueError(
            f"{what} labels have batch {labels.shape[0]}, the sample has batch {batch}; allowed: () or ({batch}, ...)"
        )
    return labels


def _null_like(null: Tensor, cond: Tensor) -> Tensor:
    """The null label broadcast to the cond labels' shape (e.g. one class id for the whole batch)."""
    null = torch.as_tensor(null, device=cond.device)
    try:
        return null.expand(cond.shape).to(cond.dtype)
    except RuntimeError as e:
        raise ValueError(f"null labels {tuple(null.shape)} must broadcast to cond labels {tuple(cond.shape)}") from e


def classifier_free(
    denoise_cond: ConditionalDenoiser,
    cond: Tensor,
    null: Tensor,
    scale: float,
    *,
    interval: tuple[float, float] | None = None,
) -> Denoiser:
    """Classifier-free guidance, D_u + w (D_c - D_u) (Ho and Salimans 2022, Eq. 6; their w is scale - 1).

    ``denoise_cond(x, sigma, labels)`` is a conditional denoiser; ``cond`` and ``null`` are its
    labels, shape ``()`` or ``(B, ...)`` (``null`` is the "no condition" label the network was
    trained with under label dropout). ``scale`` w >= 0: 0 is unconditional, 1 plain conditional.
    The network runs once per call on a doubled batch ``[x; x]`` with labels ``[cond; null]``.

    ``interval=(sigma_lo, sigma_hi)``: guide only for ``sigma_lo < sigma <= sigma_hi`` and use the
    conditional output elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited
    interval"); when no sample of the batch is inside, only the conditional half is evaluated.
    """
    scale = _check_scale(scale)
    interval = _check_interval(interval)

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        B = x.shape[0]
        c = _labels_for(cond, B, "cond")
        u = _null_like(null, c)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        w = torch.full_like(sigma, scale)  # () or (B,): the scale each sample gets
        if interval is not None:
            inside = (sigma > interval[0]) & (sigma <= interval[1])
            if not inside.any():  # cheaper: the null half would be thrown away
                return denoise_cond(x, sigma, c)
            w = torch.where(inside, w, torch.ones_like(w))
        sigma2 = sigma if sigma.ndim == 0 else torch.cat([sigma, sigma])
        d_c, d_u = denoise_cond(torch.cat([x, x]), sigma2, torch.cat([c, u])).chunk(2)
        return d_u + expand(w, d_c) * (d_c - d_u)

    return guided


def conditioned(denoise_cond: ConditionalDenoiser, labels: Tensor, null: Tensor, scale: float = 1.0) -> Denoiser:
    """``denoise_cond`` at fixed ``labels``; classifier-free guided (:func:`classifier_free`) when scale != 1."""
    if scale == 1.0:
        return lambda x, sigma: denoise_cond(x, sigma, labels)
    return classifier_free(denoise_cond, labels, null, scale)


def autoguidance(good: Denoiser, bad: Denoiser, scale: float) -> Denoiser:
    """Autoguidance, D_bad + w (D_good - D_bad) (Karras et al. 2024, "Guiding a diffusion model with a bad
    version of itself", Eq. 1 with D_1 = good, D_0 = bad; EDM2's ``gnet_out.lerp(net_out, guidance)``).

    ``good`` and ``bad`` are denoisers over the same data space (shapes as any denoiser: ``x``
    ``(B, ...)``, ``sigma`` ``()`` or ``(B,)``); ``bad`` is a weaker model of the same task (smaller,
    trained for less), so its errors point the same way as the good model's, only more. ``scale``
    w >= 0: 1 is the good model, 0 the bad one, w > 1 pushes away from the bad model's errors.
    At fixed (x, sigma) the combination is affine with weights summing to 1, so the same w gives the
    same guided model in eps space ((x - D) / sigma) and score space ((D - x) / sigma^2): the guided
    score is grad log p_good^w p_bad^(1 - w). Conditional models are guided at the same condition:
    close each over it first (e.g. :func:`conditioned`, which also applies classifier-free guidance),
    then D = CFG_bad + w (CFG_good - CFG_bad). Two network evaluations per call (one when w is 1 or 0).
    """
    scale = _check_scale(scale)
    if scale == 1.0:
        return good
    if scale == 0.0:
        return bad

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        d_bad = bad(x, sigma)
        return d_bad + scale * (good(x, sigma) - d_bad)

    return guided


def classifier_guidance(denoise: Denoiser, log_prob: LogProb, scale: float) -> Denoiser:
    """Classifier guidance, score + s grad log p(y | x_sigma) (Dhariwal and Nichol 2021, Alg. 1).

    ``log_prob(x, sigma) -> (B,)`` is a noise-aware classifier's log p(y | x) for the wanted
    labels (close over them). As the score is ``(D - x) / sigma^2``, the guided denoiser is
    ``D + s sigma^2 grad_x log p(y | x)``. With s = 1 and an exact classifier this is exactly the
    conditional denoiser (Bayes: grad log p(x | y) = grad log p(x) + grad log p(y | x)).
    """
    scale = _check_scale(scale)

    def guided(x: Tensor, sigma: Tensor) -> Tensor:
        d = denoise(x, sigma)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        # Samplers run under no_grad, so switch grad on locally, on a detached leaf.
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = log_prob(xg, sigma.detach())
            if lp.shape != (x.shape[0],):
                raise ValueError(f"log_prob must return shape ({x.shape[0]},), got {tuple(lp.shape)}")
            # Samples are independent, so the gradient of the sum is each sample's own gradient.
            (grad,) = torch.autograd.grad(lp.sum(), xg)
        return d + scale * expand(sigma, d) ** 2 * grad.to(d.dtype)

    return guided


def _check_broadcast(x: Tensor, known: Tensor, mask: Tensor) -> None:
    try:
        ok = torch.broadcast_shapes(x.shape, known.shape, mask.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"known {tuple(known.shape)} and mask {tuple(mask.shape)} must broadcast to x {tuple(x.shape)}"
        )


def _reconstruction_step(denoise: Denoiser, x: Tensor, sigma: Tensor, k: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """D(x) and J_D(x)^T (m * (k - D(x))): one forward and one vector-Jacobian product."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        d = denoise(xg, sigma)
        (vjp,) = torch.autograd.grad(d, xg, grad_outputs=m * (k - d.detach()))
    return d.detach(), vjp


def inpaint(
    denoise: Denoiser,
    known: Tensor,
    mask: Tensor,
    *,
    guidance: float = 1.0,
    sigma_data: float = 1.0,
    generator: Generator = None,
) -> Denoiser:
    """Inpainting: replacement (Song et al. 2021, App. I.2) plus reconstruction guidance (Ho et al.
    2022, "Video diffusion models", Sec. 3.1), weighted as in PiGDM (Song et al. 2023, Sec. 3).

    ``known`` holds the observed values and ``mask`` is 1 where an entry is known, 0 where it is to
    be imputed; both broadcast to the sample ``x`` ``(B, ...)`` (e.g. one mask ``(1, C, H, W)``).
    Each call (1) replaces the known part of ``x`` by a fresh draw ``known + sigma z`` from
    q_sigma(x_known | known); (2) evaluates D on it; (3) adds ``guidance * sigma^2 grad log p(known |
    x)`` with p(x0 | x) approximated by N(D(x), r^2 I), r^2 = sigma^2 sigma_data^2 / (sigma^2 +
    sigma_data^2), i.e. ``guidance (1 + sigma^2 / sigma_data^2) J_D^T (mask (known - D))``;
    (4) returns ``mask * known + (1 - mask) * D``, so a sampler ends on the known values exactly.

    Why guidance: replacement alone steers the unknown part only through what the denoiser infers
    from a noisy copy of the known part, which at high noise says little, and at low noise the
    unknown part is already fixed. On a 2-D Gaussian with correlation 0.8 plain replacement
    (``guidance=0``: no gradient, cheaper) moves the imputed mean only about 40% (Euler) to 60%
    (ancestral) of the way to E[x0_u | x0_k]; with ``guidance=1`` about 95%. For Gaussian data it
    is exact when Cov[x0_k | x] = r^2 I (e.g. N(mu, sigma_data^2 I)), approximate otherwise.
    Guidance backpropagates through the denoiser (it needs grad, not ``torch.inference_mode``).
    The wrapped denoiser is random (step 1): use it with fixed-step samplers, not adaptive ones.
    ``generator``: one ``torch.Generator``, or one per sample so a sample does not depend on its batch.
    """
    guidance = _check_scale(guidance)
    if not (math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data}")
    known = torch.as_tensor(known)
    mask = torch.as_tensor(mask)
    try:
        torch.broadcast_shapes(known.shape, mask.shape)
    except RuntimeError as e:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast with known {tuple(known.shape)}") from e
    if ((mask != 0) & (mask != 1)).any():
        raise ValueError("mask must hold only 0 (impute) and 1 (known)")
    if not torch.isfinite(known).all():
        raise ValueError("known values must be finite (put any finite value where mask is 0)")

    def conditioned(x: Tensor, sigma: Tensor) -> Tensor:
        _check_broadcast(x, known, mask)
        m, k = mask.to(x), known.to(x)
        sigma_x = expand(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x)
        x = m * (k + sigma_x * randn_like(x, generator)) + (1 - m) * x
        if guidance == 0:
            d = denoise(x, sigma)
        else:
            d, vjp = _reconstruction_step(denoise, x, sigma, k, m)
            d = d + guidance * (1 + sigma_x**2 / sigma_data**2) * vjp
        return m * k + (1 - m) * d

    return conditioned
