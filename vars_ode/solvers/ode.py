"""The ODE solvers: the coupled z/u dynamics of Eq. 8-9 (:class:`vars_ode.dynamics.VARSField`) integrated
by torchdiffeq's methods or by :mod:`vars_ode.solvers.native`, for any :class:`vars_ode.lasso.Operator`.

The problem is first rescaled by its Lipschitz constant ``L`` (``K -> K/L``, ``b -> b/L``,
``w -> w/L``): the minimiser is unchanged, the spectrum of ``K`` is bounded by one and the flow is
no longer stiff at the top of the spectrum. In these units one unit of time is close to one ISTA iteration.

Two modes:

* steady state (default): integrate window after window (lengths ``window``, doubling up to
  ``max_window``, default 32); after each, problems whose KKT residual is at or below ``tol`` are frozen (their
  field is multiplied by zero, so adaptive step control ignores them). Stops when all are frozen,
  when ``max_iter`` function evaluations have been spent, or at time ``t_max``. ``max_iter`` also ends a window: the
  native adaptive loop stops at its next look at the device after it (one attempt later on a CPU, at most
  ``check_every`` = 16 on a GPU; :attr:`vars_ode.solvers.native.AdaptiveRK.budget`), and on
  torchdiffeq the field is zero once it is spent; only a native fixed-step window runs to its end (``max_window``
  units, 171 evaluations of rk4 with its default step). Where no gradient flows through
  the steps (``grad="implicit"``, or no input that requires one), the native adaptive methods take a window without
  a common end (:meth:`vars_ode.solvers.native.AdaptiveRK.advance`: each problem at its own step size until the
  median problem has advanced by the window's length) and, by default, Hairer's stabilised step control
  (:data:`STEADY_BETA`): there the time at which a problem is looked at does not matter, and its step sits at the
  stability limit. Such an integration runs without a graph and without the autograd node below, even in grad mode;
  with ``options={"compile": True}`` (a Gram-form problem) each of its attempts is one compiled function
  (:func:`vars_ode.solvers.compiled_ode.steady_attempt`). In a native adaptive integration, a problem whose
  residual stops falling within ten times ``tol`` has its tolerances tightened (:data:`STALL_TIGHTEN`).
* fixed horizon (``t_end=T``): one integration over ``[0, T]``, with no check of this module's.

Integrators (``integrator=``):

* ``"torchdiffeq"``: torchdiffeq's ``odeint`` (or ``odeint_adjoint``). It synchronises with the device
  at every step: the fixed-step loop compares the step's time with the output times, and the
  adaptive methods read their error ratio to accept or reject the step. Their error norm is the
  largest root-mean-square over the problems, not torchdiffeq's RMS over the whole state,
  in which converged problems would loosen the tolerance of the others; ``options={"norm": ...}``
  replaces it.
* ``"native"`` (:mod:`vars_ode.solvers.native`): the fixed-step methods ``euler``, ``midpoint``,
  ``heun2``, ``heun3``, ``rk4`` (torchdiffeq's tableaux and grid, the same result) and the adaptive
  ``dopri5``, ``bosh3``, ``dopri8``, ``fehlberg2`` and ``adaptive_heun`` (torchdiffeq's pairs) with one step size per
  problem, which look at the device once every
  ``options["check_every"]`` attempts (default 16) instead of at every step. A differentiated integration is one
  autograd node with a hand-written reverse pass (:mod:`vars_ode.solvers.gram_ode`): on an operator with a Gram
  matrix (VARS-D, the dense static atoms, :func:`vars_ode.solve`) with ``K / L`` formed once, on the others (the
  convolutional templates, their union with the dynamic atoms) applying ``K`` by ``gram_apply`` and taking the
  operator's gradient through its roots (:func:`node_capable`). ``grad="adjoint"`` is its discrete adjoint: the
  reverse pass keeps one state per step and evaluates each step's stages again, the exact gradient of the
  computed trajectory.
* ``"auto"`` (default): ``"native"`` for every method it has, torchdiffeq for the others; with ``grad="adjoint"``
  native where the node runs (every operator of the library), torchdiffeq's continuous adjoint otherwise, which
  :func:`choose_integrator` allows over a fixed horizon only.
"""
from __future__ import annotations

import math
import warnings

import torch
from .._validation import check_choice, check_non_negative
from ..dynamics import VARSField
from ..lasso import GramOperator, Operator, kkt_residual_operator, tmap
from ..ops import _soft
from . import compiled_ode, gram_ode, native

#: torchdiffeq's methods (the keys of its solver table, ``torchdiffeq._impl.odeint.SOLVERS``, which is private:
#: ``tests/test_solvers.py`` checks this tuple against it).
TORCHDIFFEQ_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "euler", "midpoint", "heun2",
                       "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams", "scipy_solver")
#: torchdiffeq methods that take a fixed step (``options={"step_size": ...}``).
FIXED_STEP = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
ODE_METHODS = TORCHDIFFEQ_METHODS
#: The default step of each fixed-step method, in units of the problem rescaled by ``L``. The rescaled field's
#: eigenvalues are real and lie in ``[-(3 + sqrt 5) / 2, 0)`` = ``[-2.62, 0)`` (``theory/energy_and_stability.md``);
#: each step is about two thirds of the method's stability limit on the negative axis (euler, midpoint, heun2: 2;
#: heun3: 2.51; rk4: 2.79), since the power-iteration ``L`` of a layer may fall slightly below the top eigenvalue.
#: Over a layer's horizon of 3 they stay within 1e-2 (euler), 2.4e-3 (midpoint) and 1.1e-3 (rk4) of the exact
#: flow relative to the output's scale, where 3 ISTA steps are 2-3e-2 from it (benchmarks/RESULTS.md); at a
#: steady state the step does not move the equilibrium, only the cost.
DEFAULT_STEP_SIZES = {"euler": 0.5, "midpoint": 0.5, "heun2": 0.5, "heun3": 0.75, "rk4": 0.75,
                      "explicit_adams": 0.1, "implicit_adams": 0.25, "fixed_adams": 0.25}
#: ``rtol / tol`` of the methods that torchdiffeq integrates to a steady state, where not 0.1 (:func:`default_rtol`)
RTOL_FACTOR = {"fehlberg2": 1e-2}
#: the least default ``rtol`` of a method to a steady state in float32 (and coarser dtypes). dopri8's error estimate,
#: a sum over 13 stages, carries float32's rounding at about this size: below it the steps shrink until the budget runs
#: out. On 18 dictionaries (six kinds, 12 signals each, 20,000 evaluations; ``python benchmarks/float32_rtol_cpu.py``,
#: benchmarks/RESULTS.md, forty-eighth session) float32 dopri8 brought 3 of 216 problems to tol 1e-6 at ``rtol``
#: tol / 10 and 152 at 1e-5 (float64 at tol / 10: 155; the positive atoms need more evaluations either way), 135 -> 159
#: at tol 1e-5, with 1.8x fewer evaluations where all converged. dopri5 and bosh3 wander at their stability limit with
#: a looser ``rtol`` (to 1e-6 at 1e-5: 93 and 55 of 216, against 162 and 170 at tol / 10) and have no floor; nor need
#: fehlberg2 and adaptive_heun one (to 1e-6 in float32 at their default: 166 and 114, float64 166 and 116; forty-ninth)
FLOAT32_RTOL_FLOOR = {"dopri8": 1e-5}
ADAMS = ("explicit_adams", "implicit_adams", "fixed_adams")
#: the Adams methods whose corrector iterates to rtol / atol (torchdiffeq's AdamsBashforthMoulton, implicit)
IMPLICIT_ADAMS = ("implicit_adams", "fixed_adams")

INTEGRATORS = ("auto", "torchdiffeq", "native")

ODE_OPTIONS = ("rtol", "atol", "options", "window", "max_window", "t_max", "t_end",
               "alpha", "beta", "gamma", "adjoint_rtol", "adjoint_atol", "trace", "integrator", "record",
               "forced")


def choose_integrator(integrator: str, method: str, grad: str, node: bool = False, horizon: bool = True) -> str:
    """``"native"`` or ``"torchdiffeq"`` for ``method`` under ``grad``; ``node``: whether a native integration of
    the operator can be one autograd node (:func:`node_capable`), which ``grad="adjoint"`` needs; ``horizon``:
    whether the integration has a fixed horizon (``t_end``, a layer's ``steps``) rather than a tolerance.

    torchdiffeq's continuous adjoint is refused without a horizon: it integrates the state backwards over the whole
    time to the steady state, where the flow that contracts forwards expands, and there its gradient was garbage
    (P 20 x 12, 3 signals, tol 1e-5, float64: the dictionary's gradient off by 4e27 times the unrolled one's norm,
    the signals' by 75%, in 12-95 times the unrolled gradient's time; benchmarks/RESULTS.md, thirty-first session)."""
    check_choice("integrator", integrator, INTEGRATORS)
    if integrator == "native":
        if method not in native.NATIVE_METHODS:
            raise ValueError(f"integrator='native' has the methods {list(native.NATIVE_METHODS)}, got method "
                             f"{method!r}; use integrator='torchdiffeq' (or 'auto')")
        if grad == "adjoint" and not node:
            raise ValueError("integrator='native' has grad='adjoint' (its discrete adjoint) on operators that can be "
                             "rebuilt from their roots (Operator.with_roots) only; here it needs "
                             "integrator='torchdiffeq' (or 'auto')")
    engine = integrator
    if integrator == "auto":
        engine = "native" if method in native.NATIVE_METHODS and (grad != "adjoint" or node) else "torchdiffeq"
    if grad == "adjoint" and engine == "torchdiffeq" and not horizon:
        why = ("integrator='torchdiffeq'" if integrator == "torchdiffeq" else
               f"{method!r} has no native integration" if method not in native.NATIVE_METHODS else
               "this operator has no native adjoint node")
        raise ValueError(f"grad='adjoint' to a tolerance (no t_end; a layer's steps=None) would be torchdiffeq's "
                         f"continuous adjoint here ({why}), which integrates the state backwards over the whole time "
                         "to the steady state, where the flow expands: its gradients were wrong by orders of "
                         "magnitude. Use grad='implicit' (the gradient at the equilibrium) or 'unroll', a horizon, "
                         f"or a native method ({', '.join(native.NATIVE_METHODS)}) for the discrete adjoint")
    return engine


def node_capable(op) -> bool:
    """Whether a native integration on ``op`` runs as one autograd node with a hand-written reverse pass
    (:mod:`vars_ode.solvers.gram_ode`): a one-block operator with a Gram matrix, or any operator that can be
    rebuilt from its roots (whose gradient the reverse pass takes through ``gram_apply``). Other operators are
    differentiated through the steps by autograd."""
    return (op.has_gram and op.num_blocks == 1) or type(op).with_roots is not Operator.with_roots


def _check_reconstruction(odeint, f, start: tuple, end: tuple, ts, kw):
    # torchdiffeq's continuous adjoint integrates the state back from ts[-1] to ts[0] in its backward pass: done here
    # once, without a graph (and without counting the evaluations), and refused where it misses the start by more than
    # ADJOINT_MISS times the state's largest entry (see there)
    nfe = f.nfe
    with torch.no_grad():
        back = odeint(f, tuple(e.detach() for e in end), ts.flip(0), **kw)
    f.nfe = nfe
    scale = max(float(t.detach().abs().amax()) for t in (*start, *end) if t.numel())
    miss = max(float((b[-1] - a.detach()).abs().amax()) for a, b in zip(start, back) if a.numel()) / max(scale, 1e-300)
    if not miss <= ADJOINT_MISS:
        T = float(ts[-1] - ts[0])
        raise ValueError(
            f"grad='adjoint' here is torchdiffeq's continuous adjoint (method {kw['method']!r}), whose backward pass "
            f"integrates the state back from t_end = {T:g} to 0, through a flow that contracts forwards and expands "
            f"backwards: that integration misses the start by {miss:.3g} times the state's largest entry (more than "
            f"vars_ode.solvers.ode.ADJOINT_MISS = {ADJOINT_MISS:g}), so the gradient it gives is unreliable (measured: "
            "17% to 6e5 times off beyond it). Use a native method "
            f"({', '.join(native.NATIVE_METHODS)}) with integrator 'auto' for the discrete adjoint (the exact gradient "
            "of the computed trajectory), grad='unroll', a shorter horizon, or a tighter adjoint_rtol / smaller step")


@torch.compiler.disable
def _eager(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` outside torch.compile's graphs. torchdiffeq's step loops decide on the host
    from the data (accepted and rejected steps), and its adaptive methods call ``torch.unique`` as they start
    (``rk_common``), whose output shape Inductor cannot lower; the native adaptive methods read the device
    between bursts of steps (each read would be a graph break and a recompilation): a compiled layer runs
    these integrations eagerly, as one graph break (an adaptive method with ``options["fixed_attempts"]`` reads
    nothing and is traced instead)."""
    return fn(*args, **kwargs)


def default_rtol(method: str, tol: float, native_engine: bool = True, dtype=None) -> float:
    """The relative tolerance of the adaptive methods for a KKT tolerance ``tol``; ``tol = 0`` (a fixed horizon)
    gives 1e-3 (a layer asks for :data:`LAYER_RTOL` instead). Near a steady state an explicit adaptive method runs
    at its stability limit and its iterates wander by about the tolerance, so the tolerance follows ``tol``
    (measured: rtol = tol stalls just above tol, rtol = tol / 10 converges, much tighter only costs evaluations;
    torchdiffeq's fehlberg2, without the native step cap :data:`STABLE_MAX_STEP`, needs tol / 100). ``dtype``: the
    state's; in float32 and coarser, no lower than :data:`FLOAT32_RTOL_FLOOR`."""
    if tol <= 0:
        return 1e-3
    factor = 0.1 if native_engine else RTOL_FACTOR.get(method, 0.1)
    floor = 1e-12
    if method in FLOAT32_RTOL_FLOOR and dtype is not None and torch.finfo(dtype).eps >= torch.finfo(torch.float32).eps:
        floor = FLOAT32_RTOL_FLOOR[method]
    return min(1e-3, max(tol * factor, floor))


#: The relative tolerance of adaptive methods in an attention layer's fixed horizon (``VARSLayer(steps=T)``): over a
#: horizon of 3, dopri5 then stays within about 1e-4 of the exact flow relative to the output's scale in 25-31
#: evaluations (from :data:`LAYER_FIRST_STEP`; 38 from the Hairer estimate; 1.2e-5 in 50 at 1e-3), where 3 ISTA
#: steps are 2e-2 from that flow (benchmarks/RESULTS.md).
LAYER_RTOL = 1e-2

#: The first step of dopri5 and bosh3 in a layer's horizon, in the rescaled field's time (instead of the per-problem
#: Hairer estimate, an evaluation that gave 0.16-0.20 there, after which the steps grew for three attempts towards the
#: stability-bound 1.0-1.3). Over a horizon of 3 (benchmarks/RESULTS.md, sixth and eleventh sessions): dopri5 from 0.5
#: takes 4 attempts on most inputs (25 evaluations; 31 from 0.3, 38 from the Hairer estimate; longer first steps
#: are rejected more often), 1e-4 from the exact flow against 6e-5 to 8e-5 from 0.3; in the study's trained models
#: 31 evaluations a layer instead of 37, the logits as far from the exact flow's. bosh3 from 0.3: 19 evaluations
#: (0.5 saves none on VARS-D and doubles the error).
LAYER_FIRST_STEP = {"dopri5": 0.5, "bosh3": 0.3}


def layer_settings(method: str, solver_options: dict) -> dict:
    """A layer's solver options with the layer's defaults for ``method`` filled in: ``rtol`` :data:`LAYER_RTOL` for the
    adaptive methods, ``options["first_step"]`` from :data:`LAYER_FIRST_STEP` for dopri5 and bosh3. The caller's dict
    is not changed."""
    opts = dict(solver_options)
    if method in ODE_METHODS and method not in FIXED_STEP:
        opts.setdefault("rtol", LAYER_RTOL)
    if method in LAYER_FIRST_STEP:
        inner = dict(opts.get("options") or {})
        inner.setdefault("first_step", LAYER_FIRST_STEP[method])
        opts["options"] = inner
    return opts


def _check_tolerance(name: str, value) -> None:
    # atol may also be a tensor (one per problem, set inside the library: not read here, which would wait on the device)
    if not (isinstance(value, torch.Tensor) and name == "atol"):
        check_non_negative(name, value)


def check_tolerances(rtol, atol, method: str | None = None) -> None:
    """A ``ValueError`` naming the argument unless ``rtol`` and ``atol`` are finite non-negative numbers, and, for an
    adaptive ``method`` (or any, without one), not both 0 (``None`` stands for the default)."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is not None:
            _check_tolerance(name, value)
    if method not in FIXED_STEP and rtol == 0 and (atol is None or (not isinstance(atol, torch.Tensor) and atol == 0)):
        raise ValueError("rtol and atol are both 0 (atol defaults to rtol / 100, or rtol / max(L, 1) to a "
                         "tolerance): every adaptive step would have to be exact; make one positive")


#: the longest step of a native adaptive method whose error estimate misses the method's own instability, in units
#: of the problem rescaled by ``L``: an ``options["max_step"]`` default at about 90% of the stability limit on the
#: rescaled field's spectrum, ``[-(3 + sqrt 5) / 2, 0)``. fehlberg2 carries its second-order solution on, whose
#: stability function ``1 + z + z^2 / 2 + (255 / 262144) z^3`` keeps ``|R| <= 1`` on the negative axis down to -2.01
#: (steps up to 2.01 / 2.62 = 0.77), and estimates its error as ``(h / 512)(k3 - k1)``, which stays within the
#: tolerance past that limit. On the Quick start's problem (100 signals, rtol tol / 100, torchdiffeq's setting for it)
#: 40 of the 100 problems wandered above tol 1e-4 without the cap until the budget of 20,000 evaluations ran out; with
#: 0.7 all converged in 3,395 evaluations (10,420 to 1e-6; 0.75: 3,197 and 10,021; 0.5: 4,595 and 12,642). With the
#: cap the other methods' rtol, tol / 10, converges too, in 3,221 and 7,457 (benchmarks/RESULTS.md, thirty-seventh
#: session)
STABLE_MAX_STEP = {"fehlberg2": 0.7}


def settings(method: str, tol: float, rtol=None, atol=None, options=None, native_engine: bool = True, dtype=None):
    """``(rtol, atol, options)`` of ``method`` with this module's defaults filled in (a fixed horizon: ``tol = 0``);
    ``native_engine``: whether the native integrator runs it (:data:`STABLE_MAX_STEP` is its option); ``dtype``: the
    state's (:func:`default_rtol`)."""
    if rtol is None:
        rtol = default_rtol(method, tol, native_engine, dtype)
    if atol is None:
        _check_tolerance("rtol", rtol)
        atol = rtol * 1e-2
    check_tolerances(rtol, atol, method)
    options = dict(options or {})
    if method in FIXED_STEP:
        options.setdefault("step_size", DEFAULT_STEP_SIZES[method])
    if method in ADAMS:
        # torchdiffeq's default order (12) has a tiny stability region: it diverges here
        options.setdefault("max_order", 4)
    if native_engine and method in STABLE_MAX_STEP:
        options.setdefault("max_step", STABLE_MAX_STEP[method])
    return rtol, atol, options


#: the native adaptive methods' ``beta`` (:class:`vars_ode.solvers.native.AdaptiveRK`) to a steady state: the value of
#: Hairer and Wanner's DOPRI5 code. On 98 configurations of dopri5 and bosh3 (1,072 problems: Gaussian, Quick-start,
#: underdetermined, positive and unnormalised dictionaries, float32 / float64, tol 1e-4 / 1e-6; benchmarks/RESULTS.md,
#: thirty-fourth session), with :meth:`~vars_ode.solvers.native.AdaptiveRK.advance`'s windows: 1,012 -> 1,032 problems
#: converged, and where all converged 1.06-1.51x fewer evaluations than before either (median 1.32x; the windows
#: alone 1.12x); 0.08, which Hairer and Wanner suggest where stability bounds the step, gave the same median but up to
#: 1.16x more on some. Over a horizon, and where a gradient is unrolled through the steps, the default stays 0
#: (torchdiffeq's rule): a layer keeps its trajectory
STEADY_BETA = 0.04

#: the longest step of a native adaptive integration to a steady state whose steps a gradient goes back through
#: (``grad="unroll"`` or ``"adjoint"`` to a ``tol``), per method, in units of the problem rescaled by ``L``: about 80%
#: of each method's stability limit on the rescaled field's spectrum ``[-2.62, 0)`` (the negative axis down to 3.31 for
#: dopri5, 2.51 for bosh3, 2.0 for adaptive_heun; fehlberg2 is capped everywhere, :data:`STABLE_MAX_STEP`). At its own
#: step size the step sits at that limit, where the forward error stays within the tolerance but the derivative of the
#: steps need not: on a convolutional VARS-SD layer (16 channels, 17 tokens, float64, ``steps=None, tol=1e-4,
#: grad="unroll"``, stopped unconverged) dopri5's input gradient was 1.25 after 5,000 evaluations and 2.7e47 after
#: 10,000; with this cap 1.24 after 10,000 and after 20,000. On the Quick start's problem (100 signals, ``P`` requiring
#: a gradient, tol 1e-6) the unrolled gradient is 6.6e-4 from the equilibrium's (``grad="implicit"``) instead of 2.0e-2,
#: in 10,561 evaluations instead of 10,591 (benchmarks/RESULTS.md, thirty-fifth session). bosh3 and adaptive_heun held
#: in float64 without a cap but not in float32 (the steps at the limit in both): of 64 problems (``P`` 24 x 32, tol
#: 1e-5) 8 and 11 had input gradients more than 10 times the equilibrium's norm away from it (up to 4.6e17, some NaN);
#: with their caps none, as in float64, in 0.99-1.02x and 1.04-1.05x the evaluations (benchmarks/RESULTS.md,
#: forty-seventh session). ``options={"max_step": ...}`` replaces it. To a steady state without such a gradient the
#: stabilised control (:data:`STEADY_BETA`) runs uncapped: a cap of 1.0 there cost dopri5 1.24x the evaluations
UNROLLED_MAX_STEP = {"dopri5": 1.0, "bosh3": 0.75, "adaptive_heun": 0.6}


#: a steady state's remedy for a problem that stalls near its tolerance (the native adaptive methods): when its KKT
#: residual has not fallen below 0.99 of its lowest so far for ``STALL_TIME`` units of time (two windows of the
#: default ``max_window``; a unit is about an ISTA iteration) and is within ``STALL_NEAR`` times ``tol``, its
#: tolerances are tightened tenfold (:attr:`vars_ode.solvers.native.AdaptiveRK.tighten`), up to ``STALL_TIGHTEN`` in
#: all and while its ``rtol`` stays above twice the dtype's resolution (the Quick start's problem in float32 converges
#: with ``rtol`` from the start down to 1e-7, 0.84 of it, in 1.1-1.4x the mean evaluations). At the stability limit
#: the step control settles where the stiffest mode neither grows nor decays, at an amplitude that its error estimate
#: sets (the stabilised control, :data:`STEADY_BETA`, exactly: a constant step and a state that alternates between two
#: points); on about one problem in 7,000 that amplitude kept the residual at 1.0-2.6 times ``tol`` for ever (bosh3,
#: benchmarks/RESULTS.md, forty-third and forty-fourth sessions). The step stays at the stability limit, so a tighter
#: tolerance there costs little
STALL_TIME = 64.0
STALL_NEAR = 10.0
STALL_TIGHTEN = 100.0

#: torchdiffeq's continuous adjoint (``grad="adjoint"`` over a horizon, for the methods without a native integration
#: and with ``integrator="torchdiffeq"``) integrates the state back from ``t_end`` to 0 in its backward pass, through a
#: flow that contracts forwards and so expands backwards: its error grows about exponentially with the horizon. The
#: forward pass integrates the end state back once the same way (without a graph) and refuses the gradient where that
#: misses the start by more than this many times the state's largest entry: the reconstructed trajectory is then
#: noise. Measured (``python benchmarks/continuous_adjoint_cpu.py``; benchmarks/RESULTS.md, forty-fifth session): on
#: ``P`` 16 x 10 with 3 signals, misses of 0.002-0.16 went with gradients 0.2-7% from the unrolled one, 0.4-3.2 with
#: 10-25%, and 5.6 or more with 17% to 6e5 times (dopri5, bosh3 and rk4 at its default step from a horizon of 5,
#: explicit_adams from 8, implicit_adams from 6; to a tolerance, refused before any of this, it was 4e27 times). In
#: layers at a horizon of 3 (dim 64, 2 heads; rk4 and dopri5 through torchdiffeq) misses of 0.26-2.0 went with 0.5-6%
ADJOINT_MISS = 5.0


def steady_atol(op, L: torch.Tensor, rtol: float, per_problem: bool):
    """The default absolute tolerance of the steady-state mode: ``rtol / max(L, 1)`` per problem. The state of the
    rescaled field is in units of the code (``u``) and of ``b / L`` (``w``), and an error ``e`` in it moves the KKT
    residual (in units of ``b``) by up to about ``L e``: ``rtol / L`` keeps that within ``rtol`` (a tenth of
    ``tol``), whatever the dictionary's scale (``vo.solve(s P, s x, 0.1 s^2, "dopri5", tol=1e-7)``, the same
    minimiser for every ``s``, ``L`` 3.3 s^2: the earlier fixed ``rtol / 100`` ran out of 20,000 evaluations at
    s = 100 with a residual of 3.5e-2, and took 1.0-2.5x the evaluations of this on unit-scale problems, median
    1.18x, float32 at 1e-6 most; benchmarks/RESULTS.md, thirty-third session). ``per_problem``: one value per problem for a one-block
    state (the native adaptive integrator takes a tensor); otherwise one float for all, the tightest."""
    if per_problem and op.num_blocks == 1:
        return (rtol / op.expand(0, L.to(torch.float64)).clamp(min=1.0)).to(L.dtype)
    return rtol / max(float(L.max()) if L.numel() else 1.0, 1.0)


def ode_solve(op, B, w, L, init, *, method, tol, max_iter, grad="unroll", rtol=None, atol=None,
              options=None, window=4.0, max_window=32.0, t_max=math.inf, t_end=None,
              alpha=1.0, beta=2.0, gamma=2.0, adjoint_rtol=None, adjoint_atol=None, trace=None,
              integrator="auto", record=None, forced=None, **unused):
    """Integrate Eq. 8-9 on the problem ``(op, B, w)`` rescaled by ``L``; returns ``(code, evaluations)``,
    ``evaluations`` per problem. ``init`` is a code tuple or ``None`` (zeros). ``record`` (a list) receives
    the code at every unit of time of a fixed horizon and at its end (the units' from a second integration without a
    graph that stops at each, so that the output does not depend on the record; recording costs that second
    integration), or after every window of the steady-state mode. ``forced``
    (a list) receives, for a native adaptive integration with a budget (``options["fixed_attempts"]``), how many
    times each problem's integration ended on a step its tolerance rejected
    (:attr:`vars_ode.solvers.native.AdaptiveRK.forced`, per problem)."""
    if unused:
        raise ValueError(f"unknown option(s) {sorted(unused)} for solver {method!r}; valid options: {sorted(ODE_OPTIONS)}")
    n = op.num_blocks
    options = dict(options or {})
    steady_backend = options.pop(compiled_ode.OPTION, None)
    if steady_backend is False or torch.compiler.is_compiling():  # (compiled whole: nothing to add)
        steady_backend = None
    elif steady_backend is not None:
        if t_end is not None or method not in native.ADAPTIVE_TABLEAUX or integrator not in ("auto", "native"):
            raise ValueError(f"options[{compiled_ode.OPTION!r}] compiles the fused layer node's integration over a "
                             "horizon (a VARSLayer with dictionary 'd' or static='dense', grad 'unroll' or 'adjoint') "
                             "and the attempts of a native adaptive integration to a steady state (a tol, no t_end; "
                             f"methods {list(native.ADAPTIVE_TABLEAUX)}); here method {method!r}, t_end {t_end!r}, "
                             f"integrator {integrator!r}: leave it out, or torch.compile the caller")
        steady_backend = compiled_ode.backend(method, steady_backend, options, steady=True)
    gram = op.has_gram and op.num_blocks == 1
    capable = node_capable(op)
    engine = choose_integrator(integrator, method, grad, capable, horizon=t_end is not None)
    auto_atol = atol is None
    rtol, atol, options = settings(method, tol, rtol, atol, options, native_engine=engine == "native",
                                   dtype=B[0].dtype)
    for name, value in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if value is not None:
            _check_tolerance(name, value)
    native_only = sorted(set(options) & set(native.NATIVE_ONLY_OPTIONS))
    if native_only and engine != "native":
        raise ValueError(f"options {native_only} are the native integrator's (methods "
                         f"{list(native.ADAPTIVE_TABLEAUX)}); here the integration runs on torchdiffeq (method "
                         f"{method!r}, grad {grad!r})")
    if options.get("fixed_attempts") is not None and t_end is None:
        raise ValueError("options['fixed_attempts'] is a budget for a fixed horizon (t_end, a layer's steps); the "
                         "steady state reads the device to stop anyway: leave it out, or give t_end")
    if method == "scipy_solver":
        options.setdefault("solver", "RK45")  # LSODA forms a dense Jacobian: n^2 memory for a layer
    elif method not in FIXED_STEP and engine == "torchdiffeq":
        # torchdiffeq's default error norm is the RMS over the whole state: converged (frozen) problems
        # add zeros to it and loosen the tolerance of the others, which then wander at their stability
        # limit without reaching `tol`. The worst problem's RMS keeps each problem's own tolerance.
        options.setdefault("norm", lambda state: op.norm(tuple(t.detach() for t in state)).amax())
    L = torch.as_tensor(L).detach()
    # (the fixed-step methods read no atol, but for the implicit Adams correctors' iterations)
    if auto_atol and tol > 0 and t_end is None and (method not in FIXED_STEP or method in IMPLICIT_ADAMS):
        atol = steady_atol(op, L, rtol, per_problem=engine == "native" and method in native.ADAPTIVE_TABLEAUX)
    scale = tuple(1.0 / op.expand(i, L) for i in range(n))
    if init is None:
        init = tuple(torch.zeros_like(b) for b in B)
    ref = B[0]

    def rec(code):
        if record is not None:
            record.append(tuple(c.detach() for c in code))

    def run(op_, B_, u_, w_):
        """The whole solve on (op_, B_, u_, w_); returns (code, evaluations per problem)."""
        thr = tuple(op.expand(i, w_) * s / (alpha * beta) for i, s in enumerate(scale))
        # a native integration with gradients is one node with a hand-written reverse pass: on a Gram operator
        # (gram_ode), on K / L formed once; on any other operator the same node applies K by its gram_apply
        # (integrate_operator); under torch.compile the integration is traced (fixed steps) or runs eagerly
        # (adaptive) as autograd's
        node = engine == "native" and capable and torch.is_grad_enabled() and not torch.compiler.is_compiling()
        checkpoint = grad == "adjoint"
        # to a steady state without a graph through the steps, each problem at its own pace (AdaptiveRK.advance) with
        # the stabilised step control; differentiated through its steps (grad="unroll" or "adjoint" to a tol) the
        # integration keeps common window ends and torchdiffeq's rule, its step capped (UNROLLED_MAX_STEP): at the
        # stability limit the derivative of the steps grew, with either rule (benchmarks/RESULTS.md, thirty-fourth and
        # thirty-fifth sessions)
        free = t_end is None and not (torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in (*op_.roots(), *B_, *u_, w_)))
        # free, the node's integration runs as it would inside the node, on the node's field, without the node and
        # its tape (which no backward pass would read)
        bare = node and free
        if steady_backend is not None and not (free and gram and engine == "native"):
            raise ValueError(f"options[{compiled_ode.OPTION!r}] compiles a steady state's attempts where no gradient "
                             "goes through them (grad='implicit', or no input that requires one) on a dictionary "
                             "with a Gram matrix (one block), integrated natively; here " + (
                                 "a gradient goes through the steps" if not free else
                                 "the operator has none" if not gram else f"the integrator is {engine}"))

        def run_bare(fn, *args):
            with torch.no_grad():
                return fn(*args)
        if (node or steady_backend is not None) and gram:
            f = VARSField(GramOperator(op_.gram() * scale[0]), tmap(torch.mul, B_, scale), thr, alpha, beta, gamma)
            run_node = gram_ode.integrate_gram
        else:
            f = VARSField(op_, tmap(torch.mul, B_, scale), thr, alpha, beta, gamma, scale=scale)
            run_node = gram_ode.integrate_operator
        state = f.initial_state(u_)
        rk = None
        if engine == "native" and method in native.ADAPTIVE_TABLEAUX:
            rk_options = options
            if free:
                rk_options = {"beta": STEADY_BETA, **options}
            elif t_end is None and method in UNROLLED_MAX_STEP:
                rk_options = {"max_step": UNROLLED_MAX_STEP[method], **options}

            def new_rk():
                return native.AdaptiveRK(f, method, rtol, atol, op.problems_like(B_).shape, ref.dtype, ref.device,
                                         rk_options, layout=op)
            rk = new_rk()
            if t_end is None:  # a steady state: max_iter bounds the evaluations within a window too
                rk.budget = max_iter
            if steady_backend is not None:
                if not compiled_ode.steady_eligible(rk):
                    raise ValueError(f"options[{compiled_ode.OPTION!r}] compiles the steady-state attempts of "
                                     "problems in the Gram layout (vo.solve, vo.solve_gram); this problem's layout "
                                     f"({type(op).__name__}, a VARSLayer's equilibrium) has none: leave it out")
                rk.attempt = compiled_ode.steady_attempt(steady_backend)

            def taped(st, tape, t0, t1):
                rk.tape = tape
                try:
                    return rk.integrate(st, t0, t1)
                finally:
                    rk.tape = None

            # its step loop reads the device between bursts of steps: eager under torch.compile, unless a budget
            # of attempts (options["fixed_attempts"]) makes it one fixed sequence of operations, which is traced
            call = _eager if rk.fixed_attempts is None else (lambda fn, *args: fn(*args))

            def integrate(st, t0, t1):
                if node:
                    return call(run_node, lambda y, tape: taped(y, tape, t0, t1), f, st, checkpoint)
                return call(rk.integrate, st, t0, t1)

            def advance(st, duration, live):  # a steady state's window (AdaptiveRK.advance): only where free
                def go(y):
                    return rk.advance(y, duration, live, t_max, max_window)
                return run_bare(go, st) if bare or rk.attempt is not None else _eager(go, st)
        elif engine == "native":
            step = native.fixed_step_size(method, options)

            def integrate(st, t0, t1):
                if bare:
                    return run_bare(native.integrate_fixed, f, st, t0, t1, method, step)
                if node:
                    return run_node(
                        lambda y, tape: native.integrate_fixed(f, y, t0, t1, method, step, tape=tape), f, st, checkpoint)
                return native.integrate_fixed(f, st, t0, t1, method, step)
        else:
            from torchdiffeq import odeint, odeint_adjoint  # here: its import (with scipy.integrate's) costs 0.5 s

            def spent_field(t, y):
                # a steady state's field once max_iter evaluations are spent: zero, evaluating nothing. torchdiffeq
                # cannot stop inside a window, whose length (up to max_window) may cost several budgets at a
                # tolerance out of reach (dopri5 at tol 1e-12: 7,904 evaluations of 1,200); on a zero field its step
                # sizes grow tenfold an attempt to the window's end, and the state stays where the budget ended
                if f.nfe >= max_iter:
                    return tuple(torch.zeros_like(v) for v in y)
                return f(t, y)

            def integrate(st, t0, t1):
                ts = torch.tensor([t0, t1], dtype=ref.dtype, device=ref.device)
                g = f if t_end is not None else spent_field
                kw = dict(rtol=rtol, atol=atol, method=method, options=options)
                if grad == "adjoint":
                    params = tuple(p for p in (*op_.roots(), *B_, w_)
                                   if isinstance(p, torch.Tensor) and p.requires_grad)
                    back_kw = dict(kw, rtol=adjoint_rtol or rtol, atol=adjoint_atol or atol)
                    sol = _eager(odeint_adjoint, f, st, ts, adjoint_params=params,
                                 adjoint_rtol=back_kw["rtol"], adjoint_atol=back_kw["atol"], **kw)
                    if params and torch.is_grad_enabled():
                        _eager(_check_reconstruction, odeint, f, st, tuple(x[-1] for x in sol), ts, back_kw)
                else:
                    if method in IMPLICIT_ADAMS and t_end is None:
                        with warnings.catch_warnings():
                            # to a steady state the corrector's 4 functional iterations fall short of rtol at the
                            # step the stability allows (contraction about 0.23 each), and torchdiffeq warns at every
                            # such step (22 times on a 12 x 6 problem at tol 1e-6); the KKT residual, not the
                            # trajectory, decides convergence there and the status reports it. Over a horizon the
                            # warning stays: there the trajectory is the answer
                            warnings.filterwarnings("ignore", message="Functional iteration did not converge")
                            sol = _eager(odeint, g, st, ts, **kw)
                    elif method != "scipy_solver":
                        sol = _eager(odeint, g, st, ts, **kw)
                    else:
                        with warnings.catch_warnings():
                            # torchdiffeq hands solve_ivp its own min_step=0 whatever the method, and scipy warns on
                            # every call that the default RK45 ignores it
                            warnings.filterwarnings("ignore", message="The following arguments have no effect for a "
                                                    "chosen solver: `min_step`")
                            sol = _eager(odeint, g, st, ts, **kw)
                return tuple(x[-1] for x in sol)

        def codes(st):
            return tuple(_soft(u, th) for u, th in zip(st[n:], thr))

        if t_end is not None:
            T = float(t_end)
            end = integrate(state, 0.0, T)
            if forced is not None and rk is not None and rk.fixed_attempts is not None:
                forced.append(rk.forced)
            evaluations = op.problems_like(B_, f.nfe, torch.long)
            if record is not None:
                # a record observes and does not steer: the output is the integration over [0, T] whether recorded
                # or not (stopping at each unit of time would change a fixed grid and an adaptive step sequence).
                # The codes at the units come from a second integration, without a graph, that stops at each one;
                # the last entry is the output's code
                node = False
                rk = new_rk() if rk is not None else None
                with torch.no_grad():
                    t0 = 0.0
                    for t1 in [float(j) for j in range(1, math.ceil(T))]:
                        state = integrate(state, t0, t1)
                        rec(codes(state))
                        t0 = t1
                rec(codes(end))
            return codes(end), evaluations

        active = op.problems_like(B_, True, torch.bool)
        evals = op.problems_like(B_, 0, torch.long)
        t, span = 0.0, float(window)
        code = codes(state)
        # (STALL_TIME) each problem's lowest residual, and the time at which it last fell below 0.99 of that
        # the largest factor a problem's tolerances may be tightened by: STALL_TIGHTEN, and rtol over it at least twice
        # the dtype's resolution
        most = min(STALL_TIGHTEN, rtol / (2 * torch.finfo(ref.dtype).eps))
        lowest, fell_at = None, None
        remedy = rk is not None and most >= 10
        while True:
            r = kkt_residual_operator(op_, code, B_, w_)
            active = active & (r > tol) & torch.isfinite(r)
            if trace is not None:
                trace.append((f.nfe, float(r.amax())))
            if not bool(active.any()) or f.nfe >= max_iter or t >= t_max:
                break
            if remedy:
                with torch.no_grad():
                    rd = r.detach()
                    if lowest is None:
                        lowest, fell_at = rd, torch.zeros_like(rd)
                    else:
                        fell_at = torch.where(rd < 0.99 * lowest, t, fell_at)
                        lowest = torch.minimum(lowest, rd)
                        stalled = active & (t - fell_at >= STALL_TIME) & (rd <= STALL_NEAR * tol)
                        if rk.tighten is None:
                            rk.tighten = torch.ones_like(rd)
                        rk.tighten = torch.where(stalled & (rk.tighten * 10 <= most), rk.tighten * 10, rk.tighten)
                        fell_at = torch.where(stalled, t, fell_at)
            act = active.to(ref.dtype)
            f.active = tuple(op.expand(i, act) for i in range(n))
            before = f.nfe
            t1 = min(t + span, t_max)
            if rk is None or not free:
                state = integrate(state, t, t1)
            else:  # (the last window before t_max takes every problem's clock there)
                state = advance(state, t1 - t if t1 < t_max else math.inf, active)
            evals = evals + (f.nfe - before) * active
            code = codes(state)
            rec(code)
            t, span = t1, min(span * 2, max_window)
        return code, evals

    if grad != "adjoint" or engine == "native":
        return run(op, tuple(B), tuple(init), w)
    # torchdiffeq's adjoint differentiates the field with respect to its adjoint_params by autograd; B and
    # the operator's roots may come from one graph (a layer's features), so the solve runs on detached
    # copies, whose gradients are then passed back onto the real inputs
    roots = op.roots()
    nr, nb = len(roots), len(B)
    w_grad = isinstance(w, torch.Tensor) and w.requires_grad
    box = {}

    def run_flat(*proxies):
        code, box["evals"] = run(op.with_roots(proxies[:nr]), proxies[nr:nr + nb], proxies[nr + nb:nr + 2 * nb],
                                 proxies[-1] if w_grad else w)
        return code

    code = _CutGraph.apply(run_flat, *roots, *B, *init, *((w,) if w_grad else ()))
    return tuple(code), box["evals"]


class _CutGraph(torch.autograd.Function):
    """``fn(*inputs)`` computed on detached copies of ``inputs``, differentiated back onto them.

    torchdiffeq's adjoint differentiates the field with respect to its ``adjoint_params`` by autograd;
    if one of them (``P^T x``) is computed from another (the atoms), the shared path would be counted
    twice. Running the solve on independent leaf copies and returning their gradients for the real
    inputs keeps every path once, so ``B`` and the atoms may come from the same graph.
    """

    @staticmethod
    def forward(ctx, fn, *inputs):
        proxies = tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs)
        with torch.enable_grad():
            outs = tuple(fn(*proxies))
        ctx.proxies, ctx.outs = proxies, outs
        return tuple(o.detach() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        want = [i for i, p in enumerate(ctx.proxies) if p.requires_grad]
        pairs = [(o, g) for o, g in zip(ctx.outs, grads) if o.requires_grad and g is not None]
        got = [None] * len(ctx.proxies)
        if want and pairs:
            # the inner graph is kept (it holds no trajectory under the adjoint) so that the outer one can be
            # differentiated again (retain_graph, gradcheck)
            gs = torch.autograd.grad([o for o, _ in pairs], [ctx.proxies[i] for i in want], [g for _, g in pairs],
                                     allow_unused=True, retain_graph=True)
            for i, g in zip(want, gs):
                got[i] = g
        return (None, *got)
