"""Runge-Kutta-Chebyshev (RKC): an explicit method whose stability grows with the square of its stages.

The explicit methods integrate the field rescaled by ``L`` at their stability limit: its eigenvalues are real and
lie in ``[-rho, -kappa_min]``, ``rho = (3 + sqrt 5) / 2`` for the paper's ``alpha, beta, gamma = 1, 2, 2``
(``theory/energy_and_stability.md``, sections 3-4; :func:`spectral_radius` for the others), so a step of dopri5 is
bounded by the fast end while the time to the equilibrium is set by the slow end. A real spectrum is the case these
methods were made for (Sommeijer, Shampine and Verwer, "RKC: an explicit solver for parabolic PDEs", 1998): the
``s`` stages of a step follow the three-term recurrence of the Chebyshev polynomials,

    Y_0 = y,   Y_1 = y + mt_1 h F(y),
    Y_j = (1 - mu_j - nu_j) y + mu_j Y_{j-1} + nu_j Y_{j-2} + mt_j h F(Y_{j-1}) + gt_j h F(y),   y_new = Y_s,

whose stability polynomial ``a_s + b_s T_s(w0 + w1 z)`` is second order (``1 + z + z^2 / 2 + O(z^3)``) and stays
within ``[-1, 1]`` on ``[-beta_s, 0]``, ``beta_s`` about ``0.65 s^2`` (damping ``epsilon = 2 / 13``,
:data:`DAMPING`). A step of length ``h`` takes the fewest stages with ``beta_s >= h rho``: the work per unit of
time falls like ``1 / sqrt(h)``, and a long step costs ``sqrt(h)`` evaluations, where dopri5 pays ``h``. The error
estimate is the paper's, ``(12 (y - y_new) + 6 h (F(y) + F(y_new))) / 15``, with ``F(y_new)`` the next step's
``F(y)``: a step costs ``s`` evaluations.

Two modes, as for the other ODE solvers (:mod:`vars_ode.solvers.ode`):

* steady state (default): one step size per problem under the error control; the batch's stage count is the one
  that the longest, then the median, then again the median live step needs, in turn (:data:`STAGE_SCHEDULE`; at
  most ``max_stages``), and every problem's step is capped at what it covers. Problems whose KKT residual is at
  or below ``tol`` are frozen. The tolerance of the steps follows ``tol`` loosely (:func:`default_rtol`): the
  trajectory is followed only as closely as the steady state needs, and at a steady state the error estimate, and
  with it the step's length, is free of the tolerance. ``record`` receives the code after every step, ``trace`` the
  residual before it.
* fixed horizon (``t_end=T``): each problem integrates to each unit of time and to ``T`` at its own steps (the last
  step of each unit shortened to land on it), or, with ``step_size``, in equal steps; ``record`` receives the code
  at each unit of time and at ``T`` (between equal steps, their cubic Hermite interpolant there).

The work counted is evaluations of the field, per problem. Gradients: ``grad="unroll"`` (autograd through the
stages; the step sizes are treated as constants) or ``"implicit"`` (:func:`vars_ode.solve_problem`);
``"adjoint"`` is refused. Any operator: the field is :class:`vars_ode.dynamics.VARSField`, as for every ODE solver.
"""
from __future__ import annotations

import functools
import math

import torch

from .._validation import check_choice, check_positive
from ..dynamics import VARSField
from ..lasso import GramOperator, kkt_residual_operator, tmap
from ..ops import _soft
from .native import equal_step_marks, hermite
from .ode import steady_atol

OPTIONS = ("rtol", "atol", "first_step", "max_stages", "step_size", "t_end", "alpha", "beta", "gamma", "trace",
           "record", "grad")

#: the damping ``epsilon`` of the stability polynomial (``w0 = 1 + epsilon / s^2``): Sommeijer, Shampine and Verwer's
#: value, which keeps ``|P_s(z)|`` below 0.97 on the inner nine tenths of the interval (``tests/test_rkc.py``, s = 2 to
#: 200), so the modes between the Chebyshev polynomial's zeros are damped too, at the price of 2% of ``beta_s``
#: (0.653 (s^2 - 1) against 2 / 3 (s^2 - 1) undamped)
DAMPING = 2.0 / 13

#: the largest stage count a step may take: a bound on one step's cost, which every live problem of a batch pays
#: (``beta_200`` is about 26,000: a step of about 9,500 units of time on the paper's field)
MAX_STAGES = 200

#: ``rho`` is multiplied by this before choosing the stages: ``L`` may fall slightly below ``K``'s top eigenvalue
#: (power iteration in a layer)
RHO_MARGIN = 1.05

#: the step size control: ``h <- h * clamp(SAFETY * err^(-1/3), MIN_FACTOR, MAX_FACTOR)``
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.8, 0.1, 10.0

#: to a steady state, the quantile of the live problems' wanted step lengths that sets the batch's stage count, step
#: after step in turn (every problem's step is capped at what those stages cover). The longest (1.0) makes every
#: problem pay for the longest step; the median alone left problems that needed long steps capped at the others'
#: (positive dictionaries: 8 of 50 converged in 30,000 evaluations at tol 1e-4). On four problem families
#: (benchmarks/RESULTS.md, thirty-eighth session) this turn took 1.7x fewer evaluations than the longest alone on the
#: Quick start's problem at 1e-6 and converged wherever it did
STAGE_SCHEDULE = (1.0, 0.5, 0.5)


@functools.lru_cache(maxsize=None)
def coefficients(s: int, damping: float = DAMPING):
    """The recurrence of an ``s``-stage step (``s >= 2``): ``(mt_1, ((mu_j, nu_j, mt_j, gt_j) for j = 2..s),
    beta_s)``, ``beta_s`` the length of the stability interval ``[-beta_s, 0]``."""
    if not isinstance(s, int) or s < 2:
        raise ValueError(f"s must be an integer of at least 2, got {s!r}")
    w0 = 1.0 + damping / (s * s)
    T, dT, ddT = [1.0, w0], [0.0, 1.0], [0.0, 0.0]  # T_j(w0) and its first two derivatives
    for j in range(2, s + 1):
        T.append(2 * w0 * T[j - 1] - T[j - 2])
        dT.append(2 * T[j - 1] + 2 * w0 * dT[j - 1] - dT[j - 2])
        ddT.append(4 * dT[j - 1] + 2 * w0 * ddT[j - 1] - ddT[j - 2])
    w1 = dT[s] / ddT[s]
    b = [0.0, 0.0] + [ddT[j] / dT[j] ** 2 for j in range(2, s + 1)]
    b[0] = b[1] = b[2]
    a = [1.0 - b[j] * T[j] for j in range(s + 1)]
    stages = []
    for j in range(2, s + 1):
        mt = 2 * b[j] * w1 / b[j - 1]
        stages.append((2 * b[j] * w0 / b[j - 1], -b[j] / b[j - 2], mt, -a[j - 1] * mt))
    return b[1] * w1, tuple(stages), (w0 + 1) / w1


def stages_for(length: float, max_stages: int = MAX_STAGES) -> int:
    """The fewest stages (at least 2, at most ``max_stages``) whose stability interval covers ``[-length, 0]``."""
    # beta_s lies between 0.6533 and 0.6544 times s^2 - 1: 0.66 (s^2 - 1) <= length leaves beta_s short of it, so
    # this start is at most the fewest; walk up from it
    s = min(max_stages, max(2, math.floor(math.sqrt(max(length, 0.0) / 0.66 + 1))))
    while s < max_stages and coefficients(s)[2] < length:
        s += 1
    return min(s, max_stages)


def spectral_radius(alpha: float, beta: float, gamma: float) -> float:
    """The largest modulus of the eigenvalues of the field rescaled by ``L`` (``K / L`` with eigenvalues in
    ``[0, 1]``): per eigenvalue ``k`` of ``K_AA / L``, ``[[-alpha, k], [1, -beta - gamma (k - 1)]]``, whose
    eigenvalues are real; ``-alpha`` and ``-beta`` for the directions off the support
    (``theory/energy_and_stability.md``, section 3). ``(3 + sqrt 5) / 2`` for ``1, 2, 2``."""
    def fastest(k):
        t = alpha + beta + gamma * (k - 1)
        return (abs(t) + math.sqrt((alpha - beta - gamma * (k - 1)) ** 2 + 4 * k)) / 2
    return max(alpha, beta, *(fastest(i / 256) for i in range(257)))


#: the steps' relative tolerance over a horizon with ``tol = 0`` (a layer's ``steps``): the loosest of 1e-3, 3e-3,
#: 1e-2 and 3e-2 that follows the flow about as closely as dopri5 at the layer's default
#: (:data:`vars_ode.solvers.ode.LAYER_RTOL`). Over a horizon of 3 (benchmarks/RESULTS.md, thirty-ninth session),
#: against rk4 in steps of 0.005: at initialisation (``VARSLayer(192, 3)``, 2 images of 197 tokens, float64) 37-44
#: evaluations and 1.2e-4 to 1.4e-4 of the output's scale (1e-3: 53-55 and 5e-5; dopri5 25 and 0.9e-4 to 1.1e-4); in
#: notebook 07's trained models 107-120 evaluations a layer and 1.7e-3 to 2.2e-3 of the logits' scale (1e-3: 165-187
#: and 1.0e-3 to 1.2e-3; dopri5 31-43 and 1.9e-3 to 2.4e-3)
HORIZON_RTOL = 3e-3


def default_rtol(tol: float) -> float:
    """The steps' relative tolerance for a KKT tolerance ``tol`` (``0``: a horizon, :data:`HORIZON_RTOL`): ``100 tol``
    up to 1e-2. On the Quick start's problem (100 signals, benchmarks/RESULTS.md) it took the fewest evaluations of
    1e-2, 1e-3 and 1e-4 at tol 1e-4 and at tol 1e-6; the dynamics' own methods need ``tol / 10``
    (:func:`vars_ode.solvers.ode.default_rtol`), because they wander at their stability limit, which a step of this
    method never reaches."""
    return min(1e-2, max(100 * tol, 1e-12)) if tol > 0 else HORIZON_RTOL


def rkc_step(f, y: tuple, F0: tuple, h: tuple, s: int, estimate: bool = True):
    """One ``s``-stage step of the field ``f`` from the state ``y`` (``F0 = f(y)``), of length ``h`` (one tensor per
    entry of the state, broadcastable to it: a length per problem): ``(y_new, f(y_new), est)``, ``est`` the local
    error estimate of each entry, ``(12 (y - y_new) + 6 h (F0 + f(y_new))) / 15`` (detached; None with
    ``estimate=False``, for equal steps)."""
    mt1, stages, _ = coefficients(s)
    hF0 = tuple(f_ * h_ for f_, h_ in zip(F0, h))
    prev2, prev = y, tuple(torch.add(a, d, alpha=mt1) for a, d in zip(y, hF0))
    for mu, nu, mt, gt in stages:
        F = f(0.0, prev)
        prev2, prev = prev, tuple(
            torch.mul(y0, 1.0 - mu - nu).add_(p1, alpha=mu).add_(p2, alpha=nu).addcmul_(fj, h_, value=mt)
            .add_(d0, alpha=gt)
            for y0, p1, p2, fj, h_, d0 in zip(y, prev, prev2, F, h, hF0))
    F1 = f(0.0, prev)
    if not estimate:
        return prev, F1, None
    with torch.no_grad():
        est = tuple((12 * (a - b) + 6 * (d + f_ * h_)) / 15 for a, b, d, f_, h_ in zip(y, prev, hF0, F1, h))
    return prev, F1, est


@torch.compiler.disable
def rkc(op, B, w, L, init, *, tol, max_iter, rtol=None, atol=None, first_step=None, max_stages=MAX_STAGES,
        step_size=None, t_end=None, alpha=1.0, beta=2.0, gamma=2.0, trace=None, record=None, grad="unroll", **unused):
    """Integrate Eq. 8-9 on ``(op, B, w)`` rescaled by ``L`` with RKC steps (see the module docstring); returns
    ``(code, evaluations)``, ``evaluations`` per problem. Under ``torch.compile`` it runs eagerly, as one graph break:
    its stage counts and step decisions are read from the data (traced, a VARS-D layer's horizon recompiled at every
    read until the recompile limit, 56 s)."""
    if unused:
        raise ValueError(f"unknown option(s) {sorted(unused)} for solver 'rkc'; valid options: {sorted(OPTIONS)}")
    if grad == "adjoint":
        raise ValueError("solver 'rkc' has no adjoint; use grad='unroll' or grad='implicit'")
    check_choice("grad", grad, ("unroll", "implicit"))
    for name, v in (("rtol", rtol), ("atol", atol), ("first_step", first_step), ("step_size", step_size)):
        check_positive(name, v, allow_none=True)
    check_positive("max_stages", max_stages, integer=True)
    if max_stages < 2:
        raise ValueError(f"max_stages must be at least 2, got {max_stages!r}")
    if step_size is not None and t_end is None:
        raise ValueError("step_size gives equal steps over a horizon (t_end, a layer's steps); a steady state takes "
                         "its steps from the error control: leave it out, or give t_end")
    al, be, ga = float(alpha), float(beta), float(gamma)
    if not (al > 0 and be > 0 and ga >= 0):
        raise ValueError(f"alpha and beta must be positive and gamma non-negative, got {alpha!r}, {beta!r}, {gamma!r}")
    n = op.num_blocks
    ref = B[0]
    dtype = ref.dtype
    L = torch.as_tensor(L, dtype=dtype, device=ref.device).detach()
    scale = tuple(1.0 / op.expand(i, L) for i in range(n))
    thr = tuple(op.expand(i, w) * s / (al * be) for i, s in enumerate(scale))
    if op.has_gram and n == 1 and scale[0].shape[-1:] in ((), (1,)):  # one L per K: K / L formed once
        f = VARSField(GramOperator(op.gram() * scale[0]), tmap(torch.mul, B, scale), thr, al, be, ga)
    else:
        f = VARSField(op, tmap(torch.mul, B, scale), thr, al, be, ga, scale=scale)
    rho = spectral_radius(al, be, ga) * RHO_MARGIN
    if rtol is None:
        rtol = default_rtol(tol)
    if atol is None:
        atol = steady_atol(op, L, rtol, per_problem=True) if tol > 0 and t_end is None else rtol * 1e-2
    atol = (atol,) * (2 * n)  # a float, or steady_atol's per-problem tensor of a one-block state (expanded)
    y = f.initial_state(None if init is None else tuple(init))
    F0 = f(0.0, y)

    def expand(t):
        return tuple(op.expand(j % n, t) for j in range(2 * n))

    def step(y, F0, h, s, estimate=True):
        """``(y_new, F(y_new), err)`` of an ``s``-stage step of per-problem length ``h``; ``err`` per problem (None
        without ``estimate``: equal steps)."""
        y1, F1, est = rkc_step(f, y, F0, expand(h), s, estimate=estimate)
        if est is None:
            return y1, F1, None
        with torch.no_grad():
            err = op.norm(tuple(e / (at + rtol * torch.maximum(a.abs(), b.abs()))
                                for e, at, a, b in zip(est, atol, y, y1)))
        return y1, F1, err

    def codes(st):
        return tuple(_soft(u, t) for u, t in zip(st[n:], thr))

    def rec(st):
        if record is not None:
            record.append(tuple(c.detach() for c in codes(st)))

    def select(mask, a, b):
        m = expand(mask)
        return tuple(torch.where(mi, ai, bi) for mi, ai, bi in zip(m, a, b))

    def control(h, err):
        return h * (SAFETY * err.clamp_min(1e-10).pow(-1.0 / 3)).nan_to_num(MIN_FACTOR).clamp(MIN_FACTOR, MAX_FACTOR)

    h0 = float(first_step) if first_step is not None else 0.5
    if t_end is not None:
        T = float(t_end)
        evals = op.problems_like(B, 1, torch.long)
        if step_size is not None:
            k = max(1, math.ceil(T / float(step_size) - 1e-9)) if T > 0 else 0
            # a unit that a step passes over: the step's cubic Hermite interpolant there
            marks = equal_step_marks(T, k) if record is not None else {}
            s = stages_for(rho * T / max(k, 1), max_stages)
            hk = op.problems_like(B, T / max(k, 1))
            for i in range(1, k + 1):
                y_prev, F_prev = y, F0
                y, F0, _ = step(y, F0, hk, s, estimate=False)
                with torch.no_grad():
                    for theta in marks.get(i, ()):
                        rec(hermite(y_prev, F_prev, y, F0, T / k, theta))
            return codes(y), evals + k * s
        h = op.problems_like(B, h0)
        t = op.problems_like(B, 0.0)
        for mark in [float(j) for j in range(1, math.ceil(T))] + [T]:
            while True:
                with torch.no_grad():
                    left = mark - t
                    going = left > 1e-12 * max(1.0, mark)
                    hs = torch.minimum(h, left)
                    # one host read a step: the longest step still to take, -1 where none is (every problem at the
                    # mark) or the budget is spent
                    longest = torch.where(going, hs, -1.0).amax()
                    longest = float(torch.where(evals.max() >= max_iter, -1.0, longest))
                if longest < 0:
                    break
                with torch.no_grad():
                    s = stages_for(longest * rho, max_stages)
                    hs = hs.clamp(max=coefficients(s)[2] / rho)
                y1, F1, err = step(y, F0, torch.where(going, hs, torch.zeros_like(hs)), s)
                with torch.no_grad():
                    ok = going & (err <= 1)
                    t = torch.where(ok, torch.where(hs >= left, torch.full_like(t, mark), t + hs), t)
                    h = torch.where(going, control(hs, err), h).clamp(max=coefficients(max_stages)[2] / rho)
                    evals = evals + s * going
                y, F0 = select(ok, y1, y), select(ok, F1, F0)
            rec(y)
        return codes(y), evals

    h = op.problems_like(B, h0)
    live = op.problems_like(B, True, torch.bool)
    evals = op.problems_like(B, 1, torch.long)
    h_top = coefficients(max_stages)[2] / rho
    nstep = 0
    while True:
        with torch.no_grad():
            r = kkt_residual_operator(op, codes(y), B, w)
            live = live & (r > tol) & torch.isfinite(r)
        if trace is not None:
            trace.append((f.nfe, float(torch.where(live, r, torch.zeros_like(r)).amax())))
        if f.nfe >= max_iter:
            break
        with torch.no_grad():
            # one host read a step: the schedule's quantile of the live problems' steps, NaN where none is live
            q = STAGE_SCHEDULE[nstep % len(STAGE_SCHEDULE)]
            wanted = float(torch.where(live, h, math.nan).flatten().nanquantile(q))
        if math.isnan(wanted):
            break
        with torch.no_grad():
            nstep += 1
            s = stages_for(wanted * rho, max_stages)
            h = h.clamp(max=coefficients(s)[2] / rho)
        y1, F1, err = step(y, F0, h, s)
        with torch.no_grad():
            ok = live & (err <= 1)
            h = torch.where(live, control(h, err), h).clamp(max=h_top)
            evals = evals + s * live
        y, F0 = select(ok, y1, y), select(ok, F1, F0)
        rec(y)
    return codes(y), evals
