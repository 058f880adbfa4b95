"""An adaptive Runge-Kutta solver for batched ODEs on tensors: Dormand-Prince 5(4).

Used by the adaptive probability-flow sampler and the exact-likelihood computation. One step
size for the whole batch (the error norm is the RMS over all elements), FSAL (the last stage of
an accepted step is the first of the next), and a count of function evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Dormand and Prince (1980), the RK5(4)7M tableau (as in scipy's RK45).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
)
_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
# Error weights: 5th-order solution minus the embedded 4th-order one (7 stages, FSAL).
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)


@dataclass
class ODEStats:
    nfe: int = 0  # function evaluations
    accepted: int = 0
    rejected: int = 0
    t: float = 0.0  # where the integration stopped (t1 unless the budget ran out with stop=True)
    max_error: float = 0.0  # largest scaled error norm of an accepted step (<= 1)


def _tree_axpy(y: tuple[Tensor, ...], h: float, terms: list[tuple[float, tuple[Tensor, ...]]]) -> tuple[Tensor, ...]:
    """y + h * sum_j a_j k_j over a tuple of tensors."""
    out = []
    for i, yi in enumerate(y):
        acc = yi.clone()
        for a, k in terms:
            if a != 0.0:
                acc = acc + (h * a) * k[i]
        out.append(acc)
    return tuple(out)


def solve_rk45(
    f: Callable[[float, tuple[Tensor, ...]], tuple[Tensor, ...]],
    y0: tuple[Tensor, ...],
    t0: float,
    t1: float,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_nfe: int | None = None,
    first_step: float | None = None,
    stop: bool = False,
) -> tuple[tuple[Tensor, ...], ODEStats]:
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction) with error control.

    ``y`` is a tuple of tensors (state and, e.g., a log-density accumulator). The error of each
    step is the RMS over all elements of err / (atol + rtol max(|y|, |y_new|)); a step is
    accepted when it is <= 1 (Hairer, Norsett and Wanner, II.4). ``max_nfe`` caps the work: if
    it would be exceeded, a ValueError says which tolerance to loosen; with ``stop=True`` the
    solver instead returns the last accepted state before a step it could not pay for (6
    evaluations), with ``stats.t`` the time it reached, so a caller can finish another way.
    """
    stats = ODEStats(t=t0)
    direction = 1.0 if t1 >= t0 else -1.0
    span = abs(t1 - t0)
    if span == 0:
        return y0, stats

    def call(t: float, y: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if max_nfe is not None and stats.nfe >= max_nfe:
            raise ValueError(
                f"the adaptive solver needs more than {max_nfe} evaluations at rtol={rtol:g}, atol={atol:g}: "
                "raise the NFE budget or loosen the tolerances"
            )
        stats.nfe += 1
        return f(t, y)

    t, y = t0, y0
    k1 = call(t, y)
    h = first_step if first_step is not None else span / 10
    while direction * (t1 - t) > 1e-12 * span:
        if stop and max_nfe is not None and stats.nfe + 6 > max_nfe:
            break
        h = min(h, abs(t1 - t))
        hs = direction * h
        ks = [k1]
        for i in range(1, 6):
            yi = _tree_axpy(y, hs, list(zip(_A[i], ks, strict=True)))
            ks.append(call(t + _C[i] * hs, yi))
        y_new = _tree_axpy(y, hs, list(zip(_B, ks, strict=True)))
        k7 = call(t + hs, y_new)
        ks.append(k7)
        err_sq, n = 0.0, 0
        for i in range(len(y)):
            e = sum(((hs * ek) * k[i] for ek, k in zip(_E, ks, strict=True) if ek != 0.0), torch.zeros_like(y[i]))
            scale = atol + rtol * torch.maximum(y[i].abs(), y_new[i].abs())
            err_sq += (e / scale).double().pow(2).sum().item()
            n += e.numel()
        err = (err_sq / max(n, 1)) ** 0.5
        if err <= 1.0:
            t, y, k1 = t + hs, y_new, k7
            stats.accepted += 1
            stats.max_error = max(stats.max_error, err)
        else:
            stats.rejected += 1
        # Standard controller with safety 0.9, growth limited to [0.2, 10].
        factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err ** (-1 / 5)))
        h = h * factor
    stats.t = t if direction * (t1 - t) > 1e-12 * span else t1
    return y, stats
