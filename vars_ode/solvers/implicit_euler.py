"""Linearly implicit Euler on the coupled dynamics of Eq. 8-9: the library's stiff method.

The explicit methods integrate the field rescaled by ``L`` at their stability limit: its eigenvalues are real and
lie in ``[-(3 + sqrt 5) / 2, -kappa_min]`` (``theory/energy_and_stability.md``), so their step is bounded by the
fast end while the time to reach the equilibrium is set by the slow end (``kappa_min``, the smallest eigenvalue of
``K / L`` on the active set). An implicit method has no such bound. Each step solves

    (I - h J) delta = h f(y),        y <- y + delta,

with ``f`` the field (:class:`vars_ode.dynamics.VARSField`, the same one the explicit methods integrate) and ``J``
its Jacobian at ``y``. The field is linear between the kinks of ``g`` (``J`` is constant while the active set
``A = {|u| > theta}`` is), so a step that does not change the active set is exactly implicit Euler. The ``2m x 2m``
system reduces (``w`` eliminated; the columns of the inactive atoms are multiples of the identity) to one symmetric
positive definite system on each problem's support, ``(p I + q K_AA) du_A = r_A``, solved by
:func:`vars_ode.ops.support_solve`, and one product for the other rows: the cost of a step is one batched Cholesky
factorisation of the supports and two products with ``K``.

Two modes, as for the other ODE solvers (:mod:`vars_ode.solvers.ode`):

* steady state (default): one step size per problem, starting at ``first_step`` and following the field's norm
  (switched evolution relaxation, the step rule of pseudo-transient continuation):
  ``h <- h * ||f_before|| / ||f_after||``, by at least 2 and at most ``growth`` per step, between ``first_step`` and
  ``max_step``. Long steps are Newton steps towards the equilibrium (the trajectory is followed only while ``h``
  is small), and Newton steps on a field with kinks can cycle between supports: a step longer than ``first_step``
  after which the field's norm grew (more than ``reject`` times, default 1, and by more than ``GROWTH_SLACK``: along
  a singular support the flow drifts with a norm that barely changes) is undone and ``h`` divided by 4, down
  to a floor, ``first_step`` at the start. Steps at the floor are always taken; one after which the norm grew
  halves the problem's floor (not below 1/16), so that its steps come to follow the flow, which converges. The
  flow itself is slow where the solution's support is not unique (a support larger than the signal dimension on
  the way, ``K_AA`` singular: eigenvalues near 0): dopri5 crawls there (31,000 evaluations where FISTA takes 350
  iterations, on ``P`` 10 x 12), and this method's long steps cross it only because ``GROWTH_SLACK`` does not take
  the drift for growth (68 steps there). Problems whose KKT residual is at or below ``tol`` are frozen. The work counted is steps (one factorisation each), rejected ones
  included; ``record`` receives the code after every step.
* fixed horizon (``t_end=T``): ``ceil(T / step_size)`` equal steps (first order in ``h``); ``record`` receives the
  code at each unit of time (between two steps, their cubic Hermite interpolant there) and at ``T``.

Gradients: ``grad="unroll"`` (through the factorisations) or ``"implicit"`` (:func:`vars_ode.solve_problem`);
``"adjoint"`` is refused. Needs an operator with a Gram matrix.
"""
from __future__ import annotations

import math

import torch

from ..dynamics import VARSField
from ..lasso import kkt_residual_operator
from ..ops import _soft, support_solve
from .native import equal_step_marks, hermite

OPTIONS = ("first_step", "growth", "max_step", "reject", "step_size", "t_end", "alpha", "beta", "gamma",
           "trace", "record", "grad")

#: an accepted step at least doubles the next one (up to ``growth``)
MIN_GROWTH = 2.0

#: the smallest floor of the step (an explicit Euler step is stable up to about 0.76 in the rescaled time)
MIN_FLOOR = 1.0 / 16

#: a field's norm that grew by less than this share did not grow (for ``reject``): where ``K_AA`` is singular the
#: flow drifts along its null space at a constant speed until an atom leaves the support, and there every step,
#: however long, changed the norm by about 1e-11 (relative; in float32 by its rounding). Counted as growth, each of
#: those steps was undone and the floor halved to ``MIN_FLOOR``: a problem of ``P`` 10 x 12 stalled at a KKT residual
#: of 3e-5 for 5,000 steps, where it now converges to 1e-10 in 68. Over 200 draws of 4 problems (5 shapes, 1,000
#: steps), unconverged in float64 at tol 1e-8 / float32 at 1e-4: 9 / 50 with no slack, 0 / 49 with 1e-6, 0 / 24 with
#: 1e-4, 0 / 13 with 2e-4, 0 / 7 with 3e-4, 0 / 1 with 1e-3 and 1 / 1 with 1e-2; but from 1e-3 on, a cycle between
#: supports (what the rule is for) went undetected: 1 of 30 problems of ``P`` 32 x 24 with ``first_step=64`` stayed
#: at a residual of 0.15 (benchmarks/RESULTS.md, forty-fifth session)
GROWTH_SLACK = 3e-4

#: the fixed step of a horizon (``t_end``), in the rescaled field's time
DEFAULT_STEP_SIZE = 0.5


def implicit_euler(op, B, w, L, init, *, tol, max_iter, first_step=1.0, growth=10.0, max_step=None, reject=1.0,
                   step_size=DEFAULT_STEP_SIZE, t_end=None, alpha=1.0, beta=2.0, gamma=2.0, trace=None,
                   record=None, grad="unroll", **unused):
    """Integrate Eq. 8-9 on ``(op, B, w)`` rescaled by ``L`` with linearly implicit Euler steps (see the module
    docstring); returns ``(code, steps)``, ``steps`` per problem."""
    if unused:
        raise ValueError(f"unknown option(s) {sorted(unused)} for solver 'implicit_euler'; valid options: "
                         f"{sorted(OPTIONS)}")
    if grad == "adjoint":
        raise ValueError("solver 'implicit_euler' has no adjoint; use grad='unroll' or grad='implicit'")
    for name, v, low in (("first_step", first_step, 0.0), ("growth", growth, 1.0), ("reject", reject, 1.0),
                         ("step_size", step_size, 0.0)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (math.isfinite(v) and v >= low) or v == 0:
            raise ValueError(f"{name} must be a finite float, {'positive' if low == 0 else f'at least {low:g}'}, "
                             f"got {v!r}")
    if op.num_blocks != 1 or not op.has_gram:
        raise ValueError("solver 'implicit_euler' needs an operator with one Gram matrix")
    al, be, ga = float(alpha), float(beta), float(gamma)
    if not (al > 0 and be > 0 and ga >= 0):
        raise ValueError(f"alpha and beta must be positive and gamma non-negative, got {alpha!r}, {beta!r}, {gamma!r}")
    K = op.gram()
    b = B[0]
    dtype = b.dtype
    eps = torch.finfo(dtype).eps
    Lc = op.expand(0, torch.as_tensor(L, dtype=dtype, device=b.device).detach())  # (..., 1, k) or (..., 1, 1)
    thr = op.expand(0, w) / (Lc * al * be)
    f = VARSField(op, (b / Lc,), (thr,), al, be, ga, scale=(1.0 / Lc,))
    state = f.initial_state(None if init is None else tuple(init))
    # the support system loses its shift as h grows (p / q ~ 1 / h): keep it above sqrt(eps) of the spectrum (1)
    h_cap = float(max_step) if max_step is not None else 1.0 / math.sqrt(eps)
    if not h_cap > 0:
        raise ValueError(f"max_step must be positive, got {max_step!r}")
    if ga > 0 and ga * al < 1:
        h_cap = min(h_cap, 0.5 * ga / (1 - ga * al))  # keeps q > 0 (below)
    if ga > be:
        h_cap = min(h_cap, 0.5 / (ga - be))  # keeps p > 0

    def step(st, F, h, live):
        """One linearly implicit Euler step of size ``h`` (``(..., k)``) where ``live``, from ``st`` where the field is
        ``F``; returns (state, moved)."""
        W, U = st
        fW, fU = F
        hc = h.unsqueeze(-2)
        c = hc * hc / (1 + hc * al)
        p = 1 + hc * (be - ga)
        q = hc * ga - c
        R = hc * fU + c * fW
        D = (U.abs() > thr).to(dtype)
        # (p I + q K_AA / L) du_A = R_A  <=>  (K_AA + (p L / q) I) du_A = (L / q) R_A: K as it is, L per problem
        sol, ok = support_solve(K, D, D * R * (Lc / q), shift=(p * Lc / q).squeeze(-2))
        dA = sol * D
        KdA = (K @ dA) / Lc
        dU = dA + (1 - D) * (R - q * KdA) / (1 + hc * be)
        dW = hc * (fW + KdA) / (1 + hc * al)
        good = (ok & live).unsqueeze(-2) & torch.isfinite(dU).all(-2, keepdim=True)
        zero = torch.zeros((), dtype=dtype, device=b.device)
        return (W + torch.where(good, dW, zero), U + torch.where(good, dU, zero)), good.squeeze(-2)

    def code_of(st):
        return (_soft(st[1], thr),)

    def rec(st):
        if record is not None:
            record.append(tuple(c.detach() for c in code_of(st)))

    if t_end is not None:
        T = float(t_end)
        n = max(math.ceil(T / float(step_size) - 1e-9), math.ceil(T / h_cap)) if T > 0 else 0
        h = op.problems_like(B, T / max(n, 1))
        live = op.problems_like(B, True, torch.bool)
        # a unit of time that a step passes over: the step's cubic Hermite interpolant there, from the field at both
        # ends (each step evaluates it at its start anyway; at T only where a unit falls inside the last step)
        marks = equal_step_marks(T, n) if record is not None else {}
        F = f(0.0, state) if n else None
        for i in range(1, n + 1):
            new, _moved = step(state, F, h, live)
            F_new = f(0.0, new) if i < n or any(theta < 1.0 for theta in marks.get(i, ())) else None
            with torch.no_grad():
                for theta in marks.get(i, ()):  # (theta = 1: the step's end itself, which needs no F_new)
                    rec(hermite(state, F, new, F_new, T / n, theta))
            state, F = new, F_new
        return code_of(state), op.problems_like(B, n, torch.long)


    h_min = op.problems_like(B, min(float(first_step), h_cap))  # per problem: the floor of the step
    h = h_min.clone()
    live = op.problems_like(B, True, torch.bool)
    steps = op.problems_like(B, 0, torch.long)
    F = f(0.0, state)
    norm = op.norm(tuple(t.detach() for t in F))
    spent = 0
    while True:
        r = kkt_residual_operator(op, code_of(state), B, w)
        live = live & (r > tol) & torch.isfinite(r)
        if trace is not None:
            trace.append((spent, float(torch.where(live, r, torch.zeros_like(r)).amax())))
        if not bool(live.any()) or spent >= max_iter:
            break
        new, moved = step(state, F, h, live)
        F_new = f(0.0, new)
        new_norm = op.norm(tuple(t.detach() for t in F_new))
        # a step at the floor follows the flow and is taken; a longer one must not let the field's norm grow more
        # than ``reject`` times (long steps are Newton-like and can cycle between supports)
        grew = new_norm > reject * (1 + GROWTH_SLACK) * norm
        floor = h <= h_min
        accept = moved & (~grew | floor)
        # a floor step after which the norm grew halves the floor, down to MIN_FLOOR: the steps at it then follow
        # the flow more closely (the norm of the field is not monotone along the flow itself: unbounded, the floor
        # fell to 1e-6 and the problem stalled)
        h_min = torch.where(moved & grew & floor, (h_min / 2).clamp(min=min(MIN_FLOOR, float(first_step))), h_min)
        # switched evolution relaxation, at least doubling: grow h as the field's norm falls; quarter it after a
        # rejected step (the ratio alone stays near 1 while the support changes, which takes hundreds of steps on an
        # ill-conditioned K: 1,000 against 140-170 for a condition number of 1e6 of K)
        ratio = (norm / new_norm.clamp_min(torch.finfo(dtype).tiny)).clamp(min=min(MIN_GROWTH, growth), max=growth)
        h = torch.where(accept, torch.minimum(torch.maximum(h * ratio, h_min), torch.full_like(h, h_cap)),
                        torch.where(live, torch.maximum(h / 4, h_min), h))
        keep = accept.unsqueeze(-2)
        state = tuple(torch.where(keep, n_, o_) for n_, o_ in zip(new, state))
        F = tuple(torch.where(keep, n_, o_) for n_, o_ in zip(F_new, F))
        norm = torch.where(accept, new_norm, norm)
        steps = steps + live
        spent += 1
        rec(state)
    return code_of(state), steps
