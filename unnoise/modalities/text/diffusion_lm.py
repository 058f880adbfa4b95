"""Diffusion-LM (Li et al. 2022, Sec. 4): continuous diffusion on learned word embeddings.

Words ``w`` (token ids ``(B, L)``) are embedded, ``x0 = EMB(w)`` ``(B, L, E)``, diffused as any
Gaussian data, and a generated ``x0`` is rounded back to the nearest word. The pieces here do not
depend on the network, which has the signature

    net(x_t (B, L, E), t (B,) float in 1..T, cond (B, K) long or None) -> x0_hat (B, L, E)

(x0-prediction, Sec. 4.2). :func:`text_denoiser` turns it into a sigma-space denoiser
``D(x, sigma) -> x0_hat`` (DESIGN.md), on which :func:`clamping` and :func:`infill` are combinators;
any sampler of :mod:`unnoise.sampling.samplers` then generates embeddings, and :meth:`WordEmbedding.round`
turns them into ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from unnoise.denoisers import TMap, from_discrete
from unnoise.diffusion import check_finite, expand, mean_flat, posterior_coefficients, q_sample
from unnoise.guidance import inpaint
from unnoise.sampling.samplers import Denoiser, Generator
from unnoise.schedules import DiscreteSchedule

__all__ = [
    "TextELBO",
    "TextLossTerms",
    "TextNetwork",
    "WordEmbedding",
    "clamping",
    "diffusion_lm_loss",
    "text_elbo",
    "infill",
    "text_denoiser",
]

TextNetwork = Callable[[Tensor, Tensor, Tensor | None], Tensor]  # net(x_t, t, cond) -> x0_hat


class WordEmbedding(nn.Module):
    """The learned embedding EMB(w) and the rounding p(w | x) of Diffusion-LM (Li et al. 2022, Sec. 4.1).

    ``weight`` (V, E) is initialised N(0, init_std^2). The default ``init_std = 1`` is
    ``nn.Embedding``'s default and the reference code's: each coordinate of x0 then has unit
    variance, the data scale VP schedules (and ``sigma_data = 1``) assume. ``init_std = dim**-0.5``
    gives rows of norm ~1 instead (coordinates much smaller than the noise of the early steps).
    """

    def __init__(self, vocab_size: int, dim: int, *, init_std: float = 1.0) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("dim", dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
        self.vocab_size, self.dim = vocab_size, dim
        self.weight = nn.Parameter(torch.randn(vocab_size, dim) * init_std)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, dim={self.dim}"

    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an int64/int32 tensor of token ids, got {getattr(ids, 'dtype', type(ids))}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}), got {ids.min().item()}..{ids.max().item()}"
            )

    def _check_x(self, x: Tensor) -> None:
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}) (the embedding dim), got {tuple(x.shape)}")

    def embed(self, ids: Tensor) -> Tensor:
        """EMB(w): ids (B, L) in [0, V) -> (B, L, E); differentiable in ``weight``."""
        self._check_ids(ids)
        return self.weight[ids.long()]

    def logits(self, x: Tensor) -> Tensor:
        """log p(w | x) up to a constant, Sec. 4.1: -||x - E_w||^2 = 2 x.E_w - |E_w|^2 - |x|^2; (..., E) -> (..., V).

        Computed with one matmul in x's dtype (no (..., V, E) difference tensor).
        """
        self._check_x(x)
        E = self.weight.to(x.dtype)
        return 2 * x @ E.T - (E**2).sum(-1) - (x**2).sum(-1, keepdim=True)

    def round(self, x: Tensor) -> Tensor:
        """Rounding, Sec. 4.2: argmax_w p(w | x), the id of the nearest embedding; (..., E) -> (...) long."""
        return self.logits(x).argmax(-1)


class TextLossTerms(NamedTuple):
    loss: Tensor  # (B,) mse + embed + rounding: what to minimise
    mse: Tensor  # (B,) ||f(x_t, t) - x0||^2 for samples with t > 1 (0 where t = 1)
    embed: Tensor  # (B,) ||EMB(w) - f(x_1, 1)||^2 for samples with t = 1 (0 elsewhere)
    rounding: Tensor  # (B,) -log p(w | x0), mean over positions


def diffusion_lm_loss(
    net: TextNetwork,
    embedding: WordEmbedding,
    ids: Tensor,
    schedule: DiscreteSchedule,
    t: Tensor,
    noise: Tensor,
    cond: Tensor | None = None,
) -> TextLossTerms:
    """Diffusion-LM's end-to-end objective with x0-prediction (Li et al. 2022, Eq. 2 with Sec. 4.2), per sample.

    L = sum_{t=2}^T ||f(x_t, t) - x0||^2 + ||EMB(w) - f(x_1, 1)||^2 - log p(w | x0), estimated at
    one step ``t`` per sample (``(B,)`` integers in 1..T, e.g. uniform), with one network call:

    - ``x0 = EMB(w)`` (``embedding.embed(ids)``, ids (B, L)): gradients flow into the table, which is
      learned jointly. The paper samples ``x0 ~ q(x0 | w) = N(EMB(w), sigma_0^2 I)``; we take
      ``sigma_0 -> 0``, so x0 is the embedding itself;
    - ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``, ``noise`` (B, L, E);
      ``x0_hat = net(x_t, t, cond)``;
    - ``mse``: the L_simple term (mean over positions and dims) of samples with t > 1; ``embed``:
      the embedding term ``||EMB(w) - mu(x_1, 1)||^2`` of samples with t = 1, where with x0 = EMB(w)
      it is the same squared error. Replacing the t = 1 term (rather than adding an extra t = 1 call
      for every sample) is what the reference code does (``th.where(t == 0, t0_loss, mse)``, steps
      there indexed from 0); both terms are means over positions and dims;
    - ``rounding``: L_round = -log p(w | x0) with p(w | x) = softmax_w(-||x - E_w||^2), mean over
      **all** positions, pads included (as the reference code): pad is a word the model must
      generate to end a sentence. Without it the joint objective is minimised by collapsing every
      embedding onto one point (Sec. 4.1).

    The prior term ``||sqrt(alpha_bar_T) x0||^2`` of the reference code is left out. Returns
    :class:`TextLossTerms`; bad shapes or ids out of range raise ``ValueError``.
    """
    x0 = embedding.embed(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must have shape (B, L), got {tuple(ids.shape)}")
    B = ids.shape[0]
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != embedded ids shape {tuple(x0.shape)} (B, L, E)")
    t = torch.as_tensor(t)
    if t.shape != (B,):
        raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
    if (t != t.round()).any() or t.min() < 1 or t.max() > schedule.T:
        raise ValueError(f"t must hold integer steps in 1..{schedule.T}, got {t.min().item()}..{t.max().item()}")
    if cond is not None and (cond.ndim != 2 or cond.shape[0] != B):
        raise ValueError(f"cond must be None or have shape ({B}, K), got {tuple(cond.shape)}")
    check_finite(noise, "noise")
    x0 = x0.to(noise.dtype)
    ab = schedule.alpha_bar[t.long().cpu()].to(x0)
    x_t = q_sample(x0, ab, noise)
    x0_hat = net(x_t, t.to(x0.dtype), cond)
    if x0_hat.shape != x0.shape:
        raise ValueError(f"net output shape {tuple(x0_hat.shape)} != data shape {tuple(x0.shape)} (B, L, E)")
    err = mean_flat((x0_hat - x0) ** 2)
    first = t.to(err.device) == 1
    mse, embed = torch.where(first, 0.0, err), torch.where(first, err, 0.0)
    logits = embedding.logits(x0)
    rounding = nn.functional.cross_entropy(logits.transpose(1, 2), ids.long(), reduction="none").mean(1)
    return TextLossTerms(mse + embed + rounding, mse, embed, rounding)


class TextELBO(NamedTuple):
    """Negative ELBO of each sequence in nats, ``nats = rounding + decoder + diffusion + prior``, all (B,)."""

    nats: Tensor
    rounding: Tensor  # -log p(w | x0)
    decoder: Tensor  # -log p(x0 | x1) + log q(x0 | w): Diffusion-LM's embedding term, weighted
    diffusion: Tensor  # sum_{t=2}^T KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), estimated over t when steps < T - 1
    prior: Tensor  # KL(q(x_T | x0) || N(0, I))


@torch.no_grad()
def text_elbo(
    net: TextNetwork,
    embedding: WordEmbedding,
    ids: Tensor,
    schedule: DiscreteSchedule,
    cond: Tensor | None = None,
    *,
    steps: int | None = None,
    generator: Generator = None,
) -> TextELBO:
    """An upper bound on -log p(w) of each sequence ``ids`` (B, L) in nats, for the x0-network ``net``.

    Diffusion-LM's model is p(w, x_{0:T}) = p(x_T) prod_t p(x_{t-1} | x_t) p(w | x0) with the
    embedding step q(x0 | w) = N(EMB(w), sigma0^2 I), sigma0^2 = 1 - alpha_bar_1 (the reference
    code's ``get_x_start``). Jensen's inequality over q(x_{0:T} | w) gives, per sequence (d = L E):

        -log p(w) <= E_q[ -log p(w | x0)                                    (rounding)
                          + ||x0 - x0_hat(x_1, 1)||^2 / (2 sigma0^2) - d / 2    (-log p(x0 | x1) + log q(x0 | w))
                          + sum_{t=2}^T c_t^2 ||x0 - x0_hat(x_t, t)||^2 / (2 beta_tilde_t)
                          + KL(q(x_T | x0) || N(0, I)) ]

    - The network f predicts EMB(w), the mean of q(x0 | w), as it was trained to. The bound scores
      predictions of x0 itself, so every step uses the posterior mean of x0 ~ N(m, sigma0^2 I)
      given x_t = sqrt(a) x0 + sqrt(1 - a) eps at m = f(x_t, t):
      x0_hat = m + sqrt(a) sigma0^2 / (a sigma0^2 + 1 - a) (x_t - sqrt(a) m). Without it, each
      step would charge the sigma0^2 noise that no prediction of EMB(w) can explain (about
      sigma0^2 d SNR(1) / 2 nats in all: 19 bits/token on E2E).
    - The decoder p(x0 | x1) = N(x0_hat(x1, 1), sigma0^2 I). Its log-density and q's entropy cancel,
      leaving Diffusion-LM's embedding term weighted by 1 / (2 sigma0^2); q's entropy is taken in
      closed form.
    - For t >= 2, p(x_{t-1} | x_t) = N(posterior mean at x0 = x0_hat(x_t, t), beta_tilde_t I) (fixed small
      variance), so each KL is the squared difference of means over 2 beta_tilde_t. Here
      c_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) is the posterior's coefficient of x0.

    One x0 ~ q(x0 | w) and one noise per step and sequence. ``steps=None`` evaluates every t
    (T network calls). ``steps=K`` is an unbiased stratified estimate of the sum over t = 2..T:
    K strata of equal width, one uniform t in each, weighted by the stratum's size (K + 1 calls).
    """
    T = schedule.T
    if T < 2:
        raise ValueError(f"the text ELBO needs a schedule with T >= 2 steps, got T={T}")
    if steps is not None and not (isinstance(steps, int) and 1 <= steps <= T - 1):
        raise ValueError(f"steps must be None (every t) or an int in 1..{T - 1}, got {steps!r}")
    emb = embedding.embed(ids)  # checks ids
    B, dtype = ids.shape[0], embedding.weight.dtype

    def randn() -> Tensor:
        return torch.randn(emb.shape, generator=generator, dtype=dtype, device=emb.device)

    ab = schedule.alpha_bar.to(dtype)
    var0 = -torch.expm1(schedule.log_alpha_bar[1]).to(dtype)  # 1 - alpha_bar_1 without cancellation
    x0 = emb + var0.sqrt() * randn()

    def sq_err(t: Tensor) -> Tensor:  # ||x0 - x0_hat(x_t, t)||^2 per sequence, t (B,) long
        a = ab[t.cpu()].to(x0.device)
        x_t = q_sample(x0, a, randn())
        m = net(x_t, t.to(dtype), cond)  # the network's EMB(w)
        gain = expand(a.sqrt() * var0 / (a * var0 + 1 - a), x_t)
        x0_hat = m + gain * (x_t - expand(a.sqrt(), x_t) * m)  # E[x0 | x_t] if EMB(w) = m
        return (x0 - x0_hat).flatten(1).square().sum(1)

    d = x0[0].numel()
    rounding = nn.functional.cross_entropy(embedding.logits(x0).transpose(1, 2), ids.long(), reduction="none").sum(1)
    decoder = sq_err(torch.ones(B, dtype=torch.long)) / (2 * var0) - d / 2
    post = posterior_coefficients(schedule.alpha_bar[1:], schedule.alpha_bar[:-1])  # float64, index t - 1
    weight = (post.coef_x0.square() / (2 * post.variance.clamp_min(1e-300))).to(dtype)  # t = 1 is unused
    if steps is None:
        chosen = [(torch.full((B,), t, dtype=torch.long), 1.0) for t in range(2, T + 1)]
    else:  # strata [lo, hi) over 2..T, one uniform draw of t per stratum and sequence
        edges = torch.linspace(2, T + 1, steps + 1, dtype=torch.float64).round().long().tolist()
        chosen = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            u = torch.rand(B, generator=generator, dtype=torch.float64, device=emb.device).cpu()
            chosen.append(((lo + u * (hi - lo)).long().clamp(max=hi - 1), float(hi - lo)))
    diffusion = torch.zeros(B, dtype=dtype, device=emb.device)
    for t, size in chosen:
        diffusion += size * weight[t - 1].to(emb.device) * sq_err(t)
    abT = ab[T]
    prior = 0.5 * (abT * x0.flatten(1).square().sum(1) + d * (-abT - torch.log1p(-abT)))
    return TextELBO(rounding + decoder + diffusion + prior, rounding, decoder, diffusion, prior)


def clamping(denoise: Denoiser, embedding: WordEmbedding, *, sigma_max: float = math.inf) -> Denoiser:
    """The clamping trick (Li et al. 2022, Sec. 4.2): D'(x, sigma) = EMB(round(D(x, sigma))).

    Each x0 estimate ``(B, L, E)`` is snapped to its nearest word embedding, so the sampler steps
    toward a sequence of words. The paper clamps at every step (the default); with ``sigma_max``,
    only samples whose sigma is ``<= sigma_max`` are clamped (the others keep D), to let the
    coarse structure form first. Rounding is an argmax: D' has no useful gradient in x (do not
    combine with gradient guidance through it).
    """
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0 (math.inf: clamp at every noise level), got {sigma_max!r}")

    def clamped(x: Tensor, sigma: Tensor) -> Tensor:
        d = denoise(x, sigma)
        snapped = embedding.embed(embedding.round(d)).to(d.dtype)
        if math.isinf(sigma_max):
            return snapped
        s = expand(torch.as_tensor(sigma, dtype=d.dtype, device=d.device), d)
        return torch.where(s <= sigma_max, snapped, d)

    return clamped


def infill(denoise: Denoiser, known_mask: Tensor, known: Tensor, *, generator: Generator = None) -> Denoiser:
    """Infilling by replacement (Song et al. 2021, App. I.2) on embeddings: an approximate conditional denoiser.

    ``known_mask`` (B, L) bool marks the given positions, ``known`` (B, L, E) their embeddings
    (``embedding.embed(ids)``; any finite value elsewhere). Each call replaces the known positions of
    x by a fresh draw ``known + sigma z`` from q_sigma(x | x0), evaluates D, and returns ``known`` at
    the known positions (exactly) and D elsewhere. Approximate: the unknown words see the context
    only through its noisy copy (Diffusion-LM itself infills by gradient-based control). It is
    :func:`unnoise.guidance.inpaint` with ``guidance=0``; the denoiser is random, so use it with
    fixed-step samplers. ``generator``: one ``torch.Generator`` or one per sample.
    """
    known_mask, known = torch.as_tensor(known_mask), torch.as_tensor(known)
    if known_mask.dtype != torch.bool or known_mask.ndim != 2:
        raise ValueError(f"known_mask must be a (B, L) bool tensor, got {known_mask.dtype} {tuple(known_mask.shape)}")
    if known.ndim != 3 or known.shape[:2] != known_mask.shape:
        raise ValueError(
            f"known must have shape (B, L, E) = {tuple(known_mask.shape)} + (E,), got {tuple(known.shape)}"
        )
    mask = known_mask[..., None].to(known.dtype if known.is_floating_point() else torch.float32)
    return inpaint(denoise, known, mask, guidance=0.0, generator=generator)


def text_denoiser(
    net: TextNetwork, schedule: DiscreteSchedule, cond: Tensor | None = None, *, t_map: TMap = "interp"
) -> Denoiser:
    """A Diffusion-LM x0-network as a sigma-space denoiser D(x, sigma) -> x0_hat, x (B, L, E).

    ``from_discrete(lambda x_t, t: net(x_t, t, cond), schedule, prediction="x0")``: the network
    receives ``x_t = x / sqrt(1 + sigma^2)`` and the (fractional with ``t_map="interp"``) step t.
    ``cond`` (B, K) is fixed for the sampler's batch (None: unconditional).
    """

    def model(x_t: Tensor, t: Tensor) -> Tensor:
        return net(x_t, t, cond)

    return from_discrete(model, schedule, prediction="x0", t_map=t_map)
