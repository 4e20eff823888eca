"""A native integration of the VARS field in Gram form over a horizon, and its reverse pass, as code compiled by
``torch.compile``: the fused layer node's ``options={"compile": True}``; and the attempts of a steady state
(:func:`steady_attempt`), ``vo.solve``'s ``options={"compile": True}``.

Run eagerly (:mod:`vars_ode.solvers.native`, :func:`vars_ode.solvers.gram_ode.reverse`), a dopri5 attempt is
about a hundred PyTorch operations over the state, each its own pass over memory and its own trip through the
dispatcher and the interpreter. An integration that reads nothing from the device (a fixed-step method, or an
adaptive one with a budget of attempts, ``options["fixed_attempts"]``) is one fixed sequence of operations, which
``torch.compile`` traces whole and Inductor fuses: the stage sums with the field's evaluation, the error estimate
with its norm, the reverse pass's sums with the stages' transposed Jacobians. The functions compiled are the
eager ones (:func:`vars_ode.solvers.native.integrate` with a :class:`vars_ode.solvers.gram_ode.Tape`, and
:func:`vars_ode.solvers.gram_ode.reverse`), so there is one integrator, traced here; the results are the eager
ones up to the rounding of reordered sums (``tests/test_compiled_ode.py``: float64 within 1e-12).

The cost: compilation once per shape, dtype and setting in a process (66-95 s for the forward and reverse graphs
of a DeiT-Ti-width layer on two CPU cores; 22 s when Inductor's cache on disk holds them from an earlier process),
a C++ compiler on CPUs. The gain: benchmarks/RESULTS.md, README "Measured results".

A steady state's loop reads the device after its attempts to stop, so it is not one fixed sequence of operations;
each of its attempts is, and on small problems an attempt is dispatch, not arithmetic (the Quick start's 100
problems: every tensor 38 KB, a dopri5 attempt about 1.1 ms eagerly, about a hundred operations). There
:func:`steady_attempt` runs each attempt as one compiled function, between the loop's looks at the device.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ..dynamics import VARSField
from ..lasso import GramOperator
from . import gram_ode, native

#: the key of the integrator's options that asks for compiled code
OPTION = "compile"


def backend(method: str, value, options: dict, steady: bool = False):
    """The ``torch.compile`` backend that ``options[OPTION] = value`` asks for (``None``: run eagerly; ``True``:
    ``"inductor"``; a backend's name or a backend callable as it is), checked against ``method`` and the other
    ``options``: over a horizon an adaptive method needs ``options["fixed_attempts"]``; to a steady state
    (``steady``), where each attempt is compiled, it needs none."""
    if value is None or value is False:
        return None
    if value is True:
        value = "inductor"
    if isinstance(value, str):
        names = torch.compiler.list_backends(exclude_tags=())
        if value not in names:
            raise ValueError(f"options[{OPTION!r}] must be True, False, a torch.compile backend ({names}) or a backend "
                             f"callable, got {value!r}")
    elif not callable(value):
        raise ValueError(f"options[{OPTION!r}] must be True, False, a torch.compile backend name or a backend "
                         f"callable, got {value!r}")
    if not steady and method in native.ADAPTIVE_TABLEAUX and options.get("fixed_attempts") is None:
        raise ValueError(f"options[{OPTION!r}] with method {method!r} needs options['fixed_attempts'] (a budget of "
                         "attempts): without one the step loop reads the device to stop, which no compiled graph "
                         "contains")
    return value


def _integrate(K, bs, W0, U0, thr, method, t_end, rtol, atol, options, checkpoint):
    field = VARSField(GramOperator(K), (bs,), (thr,))
    tape, forced = gram_ode.Tape(checkpoint), []
    W, U = native.integrate(field, (W0, U0), 0.0, t_end, method, rtol, atol, options, tape=tape, forced=forced)
    return W, U, tape.steps, field.nfe, forced[0] if forced else None


def _reverse(K, bs, thr, steps, checkpoint, coeffs, gU):
    field = VARSField(GramOperator(K), (bs,), (thr,))  # evaluates the stages again from a checkpointed tape
    tape = gram_ode.Tape(checkpoint)
    tape.steps = steps
    return gram_ode.reverse(tape, field, K, thr, coeffs, None, gU)


#: how many compiled versions of each function (one per shape, dtype, method, budget, ...) a process may hold;
#: torch.compile's own limit, 8 per function, would fail the ninth setting (fullgraph=True fails where it would
#: otherwise fall back to eager code), and two dictionaries' solver tables in one process need more
RECOMPILE_LIMIT = 64

_COMPILED = {}


def _compiled(fn, backend):
    # under a Python dispatch mode (vars_ode.sync.count_host_syncs counting reads, a FakeTensorMode) torch.compile
    # traces nothing: there the same function runs as it is, eagerly
    if is_in_torch_dispatch_mode(include_infra_modes=False):
        return fn
    key = (fn, backend)
    if key not in _COMPILED:
        compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)

        def call(*args):
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled(*args)

        _COMPILED[key] = call
    return _COMPILED[key]


@torch.no_grad()
def integrate(K, bs, y0, thr: float, method: str, t_end: float, rtol: float, atol, options: dict,
              checkpoint: bool = False, *, backend="inductor"):
    """``(W, U, tape, evaluations, forced)``: :func:`vars_ode.solvers.native.integrate` of ``VARSField(K, bs, thr)``
    (one Gram block, Eq. 8-9's alpha, beta, gamma) from ``y0 = (W0, U0)`` over ``[0, t_end]``, compiled by
    ``backend``; ``tape`` a :class:`vars_ode.solvers.gram_ode.Tape` (``checkpoint`` as there) for :func:`reverse`;
    ``forced`` the budget's forced steps per problem (:attr:`vars_ode.solvers.native.AdaptiveRK.forced`), ``None``
    for a fixed-step method."""
    W0, U0 = y0
    atol = atol if isinstance(atol, torch.Tensor) else float(atol)
    W, U, steps, nfe, forced = _compiled(_integrate, backend)(K, bs, W0, U0, float(thr), method, float(t_end),
                                                              float(rtol), atol, dict(options), bool(checkpoint))
    tape = gram_ode.Tape(checkpoint)
    tape.steps = list(steps)
    return W, U, tape, nfe, forced


@torch.no_grad()
def reverse(tape, K, bs, thr: float, coeffs, gU, *, backend="inductor"):
    """:func:`vars_ode.solvers.gram_ode.reverse` of a tape from :func:`integrate` (the same ``K``, ``bs``,
    ``thr``), compiled by ``backend``: ``(dK, db, None, gW0, gU0)`` from the gradient ``gU`` of the end's ``U``
    (``W``'s is zero)."""
    return _compiled(_reverse, backend)(K, bs, float(thr), tape.steps, tape.checkpoint,
                                        tuple(float(c) for c in coeffs), gU)


def steady_eligible(rk) -> bool:
    """Whether :func:`steady_attempt` covers the integrator ``rk``: a :class:`vars_ode.dynamics.VARSField` of one
    block on a Gram matrix (its ``K`` scaled already, no ``scale``), in the Gram layout, without a tape."""
    f = rk.f
    return (type(f) is VARSField and type(f.op) is GramOperator and len(f.Bs) == 1 and f.scale is None
            and type(rk.layout) is GramOperator and rk.tape is None)


def _steady_attempt(K, b, thr, active, W, U, t, dt, previous, tighten, k1W, k1U, atol, end, method, rtol, alpha, beta,
                    gamma, settings):
    field = VARSField(GramOperator(K), (b,), (thr,), alpha, beta, gamma, active=active)
    safety, ifactor, dfactor, control, stretch, max_step = settings
    rk = native.AdaptiveRK(field, method, rtol, atol, dt.shape, dt.dtype, dt.device,
                           {"safety": safety, "ifactor": ifactor, "dfactor": dfactor, "beta": control,
                            "stretch": stretch})
    rk.max_step = max_step
    rk.dt, rk.previous, rk.tighten, rk.k1 = dt, previous, tighten, (k1W, k1U)
    (W, U), t = rk._attempt((W, U), t, 0.0, end)
    return W, U, t, rk.dt, rk.previous, rk.k1[0], rk.k1[1], rk.evaluations


def steady_attempt(backend="inductor"):
    """``fn(rk, y, t, end) -> (y, t)``: one attempt of :meth:`vars_ode.solvers.native.AdaptiveRK.advance` compiled by
    ``backend``, for an integrator that :func:`steady_eligible` covers (set as ``rk.attempt``). The same attempt as
    the eager one, up to the rounding of reordered sums; its counters (``attempts``, ``evaluations``, the field's
    ``nfe``) advance as there. Compiled once per shape, dtype, method and setting in a process (about 12 s for the
    Quick start's dopri5 on two CPU cores)."""
    def attempt(rk, y, t, end):
        f = rk.f
        if rk.previous is None:  # (as the eager attempt starts the stabilised control)
            rk.previous = torch.full_like(rk.dt, 1e-4)
        active = f.active[0] if isinstance(f.active, tuple) else f.active
        settings = (rk.safety, rk.ifactor, rk.dfactor, rk.beta, rk.stretch, rk.max_step)
        W, U, t, rk.dt, rk.previous, k1W, k1U, evaluations = _compiled(_steady_attempt, backend)(
            f.op.K, f.Bs[0], f.thr[0], active, y[0], y[1], t, rk.dt, rk.previous,
            torch.ones_like(rk.dt) if rk.tighten is None else rk.tighten, rk.k1[0], rk.k1[1], rk.atol,
            float(end), rk.method, rk.rtol, float(f.alpha), float(f.beta), float(f.gamma), settings)
        rk.k1 = (k1W, k1U)
        rk.evaluations += evaluations
        rk.attempts += 1
        f.nfe += len(rk.c) - 1
        return (W, U), t
    return attempt
