"""The table of solvers: one name, one function, and what the function covers.

A solver is a function ``fn(op, B, w, L, init, *, tol, max_iter, **options) -> (code, iterations)`` written
against :class:`vars_ode.lasso.Operator` (see :mod:`vars_ode.solvers.iterative` for three of them and
:mod:`vars_ode.solvers.admm` for a fourth):
``B`` and ``init`` are code tuples (``init`` may be ``None``: zeros), ``w`` the L1 weight and ``L`` the
Lipschitz bound (floats or per-problem tensors), ``tol`` the KKT residual at which a problem may stop
(``0``: run exactly the budget), ``max_iter`` the budget; it returns the code tuple and the work per problem.
Registered, it runs through :func:`vars_ode.solve`, :func:`vars_ode.solve_gram` and every
:class:`vars_ode.VARSLayer` path (with ``steps=k`` the layer calls it with ``tol=0, max_iter=k``)::

    vars_ode.register_solver("my_ista", my_ista)
    vars_ode.VARSLayer(192, 3, solver="my_ista")

ODE solvers (``ode=True``) also take ``t_end`` (the layer's ``steps``, a horizon) and ``grad``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

from . import admm, coordinate, implicit_euler, iterative, ode, rkc


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    Attributes:
        name: the name given to ``solver=``.
        fn: the function (see the module docstring).
        unit: what its work counts (``"iterations"``, ``"function evaluations"``).
        ode: whether it integrates Eq. 8-9 (a layer's ``steps`` is then a horizon; ``grad="adjoint"`` allowed).
        needs_gram: whether it needs the matrix ``K`` (:attr:`vars_ode.lasso.Operator.has_gram`).
        max_iter: its default budget when solving to a tolerance.
        uses_lipschitz: whether it reads ``L`` (otherwise the callers skip computing it and pass 1).
        unrolls: whether autograd can differentiate through its iterations (``grad="unroll"``); a compiled solver
            (``"cd"``) or one that leaves torch (``"scipy_solver"``) cannot, and a layer then asks for
            ``grad="implicit"``, as :func:`vars_ode.solve` does where its inputs require gradients.
        uses_metric: whether, solving to a tolerance with ``metric="auto"``, it steps in the operator's metric where
            one is offered (:meth:`vars_ode.lasso.Operator.metric`) and reads ``L`` only where none is; the Gram
            entries then ask for the metric first and take ``L`` from it instead of computing it.
    """

    name: str
    fn: Callable
    unit: str = "iterations"
    ode: bool = False
    needs_gram: bool = False
    max_iter: int = 10_000
    uses_lipschitz: bool = True
    unrolls: bool = True
    uses_metric: bool = False


#: name -> :class:`SolverSpec`; every solver of the library, and those registered with :func:`register_solver`
SOLVERS: dict[str, SolverSpec] = {}


def register_solver(name: str, fn: Callable, *, unit: str = "iterations", ode: bool = False,
                    needs_gram: bool = False, max_iter: int = 10_000, uses_lipschitz: bool = True,
                    unrolls: bool = True, uses_metric: bool = False, replace: bool = False) -> SolverSpec:
    """Make ``fn`` available as ``solver=name`` everywhere (see the module docstring); returns its spec.

    Raises ValueError for a name already taken (unless ``replace=True``) or a ``fn`` that is not callable."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if name in SOLVERS and not replace:
        raise ValueError(f"solver {name!r} is already registered; pass replace=True to replace it")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    spec = SolverSpec(name, fn, unit, bool(ode), bool(needs_gram), max_iter, bool(uses_lipschitz), bool(unrolls),
                      bool(uses_metric))
    SOLVERS[name] = spec
    return spec


def unregister_solver(name: str) -> None:
    """Remove a registered solver."""
    if name not in SOLVERS:
        raise ValueError(f"no solver {name!r} is registered; registered: {sorted(SOLVERS)}")
    del SOLVERS[name]


def is_ode(name: str) -> bool:
    """Whether ``name`` is a registered ODE solver."""
    return name in SOLVERS and SOLVERS[name].ode


DEFAULT_MAX_ITER = 10_000  #: ista / fista / active_set iterations
#: vector-field evaluations for ODE solvers: a few seconds on a CPU for a small problem (about 5 s for 100
#: problems of 64 x 48), and enough for the library's problems to 1e-6 (the Quick start's: 14,465 for dopri5)
DEFAULT_MAX_EVALS = 20_000
#: implicit_euler's steps (one factorisation of the supports each)
DEFAULT_MAX_STEPS = 1_000

register_solver("ista", iterative.ista, uses_metric=True)
register_solver("fista", iterative.fista, uses_metric=True)
register_solver("active_set", iterative.active_set, needs_gram=True, uses_metric=True)
register_solver("admm", admm.admm, needs_gram=True)
register_solver("cd", coordinate.coordinate_descent, unit="sweeps", needs_gram=True, uses_lipschitz=False,
                unrolls=False)
for _m in ode.ODE_METHODS:
    # scipy's solve_ivp integrates numpy arrays, outside autograd
    register_solver(_m, partial(ode.ode_solve, method=_m), unit="function evaluations", ode=True,
                    max_iter=DEFAULT_MAX_EVALS, unrolls=_m != "scipy_solver")
register_solver("implicit_euler", implicit_euler.implicit_euler, unit="steps", ode=True, needs_gram=True,
                max_iter=DEFAULT_MAX_STEPS)
register_solver("rkc", rkc.rkc, unit="function evaluations", ode=True, max_iter=DEFAULT_MAX_EVALS)
#: the library's own ODE solvers (the torchdiffeq methods, the stiff implicit_euler and rkc), as registered above
ODE_SOLVERS = tuple(name for name, spec in SOLVERS.items() if spec.ode)
