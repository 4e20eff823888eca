"""torchdiffeq solvers on the coupled z/u dynamics (Eq. 8-9), in Gram form.

The problem is first rescaled by its Lipschitz constant ``L`` (``K -> K/L``, ``B -> B/L``,
``w -> w/L``): the minimiser is unchanged, the spectrum of ``K`` is bounded by one and the flow is
no longer stiff. In these units one unit of time is close to one ISTA iteration.

Two modes:

* steady state (default): integrate window after window (lengths ``window``, doubling up to
  ``max_window``, default 32); after each, problems whose KKT residual is at or below ``tol`` are frozen (their
  field is multiplied by zero, so adaptive step control ignores them). Stops when all are frozen,
  when ``max_iter`` function evaluations have been spent, or at time ``t_max``.
* fixed horizon (``t_end=T``): one integration over ``[0, T]``, with no check of this module's.

Integrators (``integrator=``):

* ``"torchdiffeq"``: torchdiffeq's ``odeint`` (or ``odeint_adjoint``). It synchronises with the device
  at every step: the fixed-step loop compares the step's time with the output times, and the
  adaptive methods read their error ratio to accept or reject the step. Their error norm is the
  largest root-mean-square over the problems (columns), not torchdiffeq's RMS over the whole state,
  in which converged problems would loosen the tolerance of the others; ``options={"norm": ...}``
  replaces it.
* ``"native"`` (:mod:`vars_ode.solvers.native`): the fixed-step methods ``euler``, ``midpoint``,
  ``heun2``, ``heun3``, ``rk4`` (torchdiffeq's tableaux and grid, the same result) and the adaptive
  ``dopri5`` and ``bosh3`` with one step size per problem, which look at the device once every
  ``options["check_every"]`` attempts (default 16) instead of at every step. Unrolled gradients only.
* ``"auto"`` (default): ``"native"`` for the fixed-step methods it has (the result does not change),
  torchdiffeq for everything else, and always with ``grad="adjoint"``.
"""
from __future__ import annotations

import math

import torch
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS as _TDE_SOLVERS

from .._validation import check_choice
from ..dynamics import GramVARSDynamics
from ..ops import _soft, kkt_residual_gram
from . import native

#: torchdiffeq methods that take a fixed step (``options={"step_size": ...}``).
FIXED_STEP = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
ODE_METHODS = tuple(_TDE_SOLVERS)
DEFAULT_STEP_SIZE = 0.25
RTOL_FACTOR = {"fehlberg2": 1e-2}
ADAMS = ("explicit_adams", "implicit_adams", "fixed_adams")

INTEGRATORS = ("auto", "torchdiffeq", "native")

ODE_OPTIONS = ("rtol", "atol", "options", "window", "max_window", "t_max", "t_end",
               "alpha", "beta", "gamma", "adjoint_rtol", "adjoint_atol", "trace", "integrator")


def _worst_column_rms(state):
    with torch.no_grad():
        return native._mixed(tuple(t.detach() for t in state)).amax()


def choose_integrator(integrator: str, method: str, grad: str) -> str:
    """``"native"`` or ``"torchdiffeq"`` for ``method`` under ``grad`` (see the module docstring)."""
    check_choice("integrator", integrator, INTEGRATORS)
    if integrator == "auto":
        return "native" if method in native.FIXED_TABLEAUX and grad != "adjoint" else "torchdiffeq"
    if integrator == "native":
        if method not in native.NATIVE_METHODS:
            raise ValueError(f"integrator='native' has the methods {list(native.NATIVE_METHODS)}, got method "
                             f"{method!r}; use integrator='torchdiffeq' (or 'auto')")
        if grad == "adjoint":
            raise ValueError("integrator='native' differentiates by unrolling; grad='adjoint' needs "
                             "integrator='torchdiffeq' (or 'auto')")
    return integrator


@torch.compiler.disable
def _eager(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` outside torch.compile's graphs. torchdiffeq's step loops decide on the host
    from the data (accepted and rejected steps), and its adaptive methods call ``torch.unique`` as they start
    (``rk_common``), whose output shape Inductor cannot lower: a compiled layer runs the integration eagerly, as a graph break."""
    return fn(*args, **kwargs)


def ode_solve(K, B, w, L, init, *, method, tol, max_iter, grad="unroll", rtol=None, atol=None,
              options=None, window=4.0, max_window=32.0, t_max=math.inf, t_end=None,
              alpha=1.0, beta=2.0, gamma=2.0, adjoint_rtol=None, adjoint_atol=None, trace=None,
              integrator="auto", **unused):
    """Returns ``(code, evaluations)``; ``evaluations`` is ``(..., 1, k)``."""
    if unused:
        raise ValueError(f"unknown option(s) {sorted(unused)} for solver {method!r}; valid options: {sorted(ODE_OPTIONS)}")
    scale = 1.0 / L
    Ks, Bs, ws = K * scale, B * scale, w * scale
    thr = ws / (alpha * beta)
    if rtol is None:
        # Near a steady state an explicit adaptive method runs at its stability limit and its
        # iterates wander by about the tolerance, so the tolerance follows `tol` (measured: rtol = tol
        # stalls just above tol, rtol = tol / 10 converges, much tighter only costs evaluations;
        # fehlberg2 needs tol / 100).
        rtol = min(1e-3, max(tol * RTOL_FACTOR.get(method, 0.1), 1e-12)) if tol > 0 else 1e-3
    if atol is None:
        atol = rtol * 1e-2
    options = dict(options or {})
    if method in FIXED_STEP:
        options.setdefault("step_size", 0.1 if method == "explicit_adams" else DEFAULT_STEP_SIZE)
    if method in ADAMS:
        # torchdiffeq's default order (12) has a tiny stability region: it diverges here
        options.setdefault("max_order", 4)
    engine = choose_integrator(integrator, method, grad)
    if method == "scipy_solver":
        options.setdefault("solver", "RK45")  # LSODA forms a dense Jacobian: n^2 memory for a layer
    elif method not in FIXED_STEP and engine == "torchdiffeq":
        # torchdiffeq's default error norm is the RMS over the whole state: converged (frozen) problems
        # add zeros to it and loosen the tolerance of the others, which then wander at their stability
        # limit without reaching `tol`. The worst problem's RMS keeps each problem's own tolerance.
        options.setdefault("norm", _worst_column_rms)
    f = GramVARSDynamics(Ks, Bs, thr, alpha, beta, gamma)
    state = f.initial_state(init)
    cols = B.shape[:-2] + (1, B.shape[-1])
    if engine == "native" and method in native.ADAPTIVE_TABLEAUX:
        native_integrate = native.AdaptiveRK(f, method, rtol, atol, cols, B.dtype, B.device, options).integrate
    elif engine == "native":
        step = native.fixed_step_size(method, options)

        def native_integrate(state, t0, t1):
            return native.integrate_fixed(f, state, t0, t1, method, step)

    def integrate(state, t0, t1):
        if engine == "native":
            return native_integrate(state, t0, t1)
        ts = torch.tensor([t0, t1], dtype=B.dtype, device=B.device)
        kw = dict(rtol=rtol, atol=atol, method=method, options=options)
        if grad == "adjoint":
            params = tuple(p for p in (Ks, Bs, thr) if isinstance(p, torch.Tensor) and p.requires_grad)
            sol = _eager(odeint_adjoint, f, state, ts, adjoint_params=params,
                         adjoint_rtol=adjoint_rtol or rtol, adjoint_atol=adjoint_atol or atol, **kw)
        else:
            sol = _eager(odeint, f, state, ts, **kw)
        return sol[0][-1], sol[1][-1]

    if t_end is not None:
        state = integrate(state, 0.0, float(t_end))
        evals = torch.full(cols, f.nfe, dtype=torch.long, device=B.device)
        return _soft(state[1], thr), evals

    active = torch.ones(cols, dtype=torch.bool, device=B.device)
    evals = torch.zeros(cols, dtype=torch.long, device=B.device)
    t, span = 0.0, float(window)
    code = _soft(state[1], thr)
    while True:
        r = kkt_residual_gram(K, B, code, w).unsqueeze(-2)
        active = active & (r > tol) & torch.isfinite(r)
        if trace is not None:
            trace.append((f.nfe, float(r.amax())))
        if not bool(active.any()) or f.nfe >= max_iter or t >= t_max:
            break
        f.active = active.to(B.dtype)
        before = f.nfe
        t1 = min(t + span, t_max)
        state = integrate(state, t, t1)
        evals = evals + (f.nfe - before) * active
        code = _soft(state[1], thr)
        t, span = t1, min(span * 2, max_window)
    return code, evals
