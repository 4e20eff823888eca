"""One pipeline for every solver and gradient mode: :func:`solve_problem` (an operator, ``b``, ``w``), and the
entries built on it: :func:`solve` (a dictionary and signals), :func:`solve_gram` (a Gram matrix) and
:func:`solve_operator` (a layer's atoms)."""
from __future__ import annotations

import math
import warnings

import torch

from .._validation import SOLVE_DTYPES, as_lam, check_broadcast, check_choice, check_last, check_tensor
from ..gradients import GRAD_MODES, IMPLICIT_SOLVES, default_cg_rtol, implicit_code
from ..lasso import GramOperator, Operator, kkt_residual_operator, tol_scale
from ..ops import CONVENTIONS, LIPSCHITZ_METHODS, kkt_violation, lipschitz_constant, penalty_weight
from ._types import Solution, SolverStats, Status
from .iterative import resolve_metric
from .registry import SOLVERS

INITS = ("zeros", "encode")


def solve(P: torch.Tensor, x: torch.Tensor, lam, solver: str = "ista", *, tol: float = 1e-6,
          max_iter: int | None = None, grad: str = "unroll", convention: str = "eq10",
          lipschitz: str = "eigvalsh", init="zeros", implicit_solve: str = "direct", **options) -> Solution:
    """Solve ``min_u 0.5 ||P u - x||^2 + w ||u||_1`` (Eq. 10; ``w = lam``, or ``2 lam`` under
    ``convention="eq22"``) for every problem, with any solver in :data:`SOLVERS`.

    Arguments:
        P: ``(..., d, m)`` dictionary; x: ``(..., d)`` signals. Leading dimensions broadcast (one
            dictionary for many signals is the fast path).
        lam: non-negative float or tensor broadcastable to the leading dimensions.
        solver: ``"ista"``, ``"fista"``, ``"active_set"``, ``"admm"``, ``"cd"`` (coordinate descent per problem,
            compiled by numba; CPU, no unrolled gradient), a torchdiffeq method (``"dopri5"``,
            ``"rk4"``, ...), which integrates the coupled dynamics of Eq. 8-9 until each problem is at a steady
            state, ``"implicit_euler"`` (the same dynamics with implicit steps, for stiff problems) or ``"rkc"``
            (the same dynamics with Runge-Kutta-Chebyshev steps, explicit, whose length grows with their stages).
        tol: KKT residual at which a problem counts as converged and is frozen, in units of
            ``max(1, ||P^T x||_inf)`` per problem (:func:`vars_ode.lasso.tol_scale`): absolute for problems of unit
            scale or less, relative above, so a problem scaled by 1e30 converges as the unscaled one; ``0`` runs
            the whole budget (no early stop, no host synchronisation in ista / fista). In float32 the residual
            itself is rounded at about ``1e-7 ||K|| ||u||``: a tolerance near it (1e-6 on the Quick start
            problem) stops problems whose residual, computed again at the end, reads just above it, and they
            come back with ``converged`` False.
        max_iter: iterations for ista / fista / active_set (default 10,000); function evaluations for
            ODE solvers (default 20,000, a few seconds for a small problem; an adaptive method stops within a step
            of it on a CPU (16 steps on a GPU), a fixed-step method at the end of its window, up to 32 units of
            time). The coupled ODE
            needs about 5-20 evaluations per ISTA-equivalent iteration (see benchmarks/RESULTS.md);
            steps for ``"implicit_euler"`` (default 1,000); sweeps over the coordinates for ``"cd"`` (default 10,000).
        grad: ``"unroll"``, ``"implicit"`` or ``"adjoint"`` (ODE solvers only); see :mod:`vars_ode.gradients`.
        lipschitz: how ``L`` is computed: ``"eigvalsh"``, ``"power"`` or ``"official"``; or pass ``L=`` (a
            float or a tensor broadcastable to ``P``'s leading dimensions). To a tolerance ista, fista and
            active_set step in a metric instead where ``K`` offers one (``metric`` below; ``metric="none"`` keeps
            ``1 / L``).
        init: ``"zeros"``, ``"encode"`` (``P^T x``, the paper's initialisation) or a ``(..., m)`` tensor.
        implicit_solve: ``"direct"`` (Cholesky solve of each problem's support block) or ``"cg"`` (conjugate gradients).
        options: solver options: ``check_every`` (ista / fista: ``"auto"``, the default, or a positive integer;
            see :mod:`vars_ode.solvers.iterative`), ``restart`` (fista), ``metric`` (ista / fista / active_set:
            ``"auto"``, the default, steps to a tolerance in the rank-one metric of a dictionary with a dominant
            direction, :meth:`vars_ode.lasso.GramOperator.metric`, in place of ``1 / L``; ``"none"``); ``rtol``
            (default ``tol / 10``, dopri8's in float32 at least 1e-5, :func:`vars_ode.solvers.ode.default_rtol`),
            ``atol`` (default ``rtol / max(L, 1)`` per problem to a tolerance, :func:`vars_ode.solvers.ode.steady_atol`;
            ``rtol / 100`` over a horizon), ``options`` (torchdiffeq's, e.g. ``{"step_size": 0.1}``; the native
            integrator's, among them ``{"compile": True}``: a steady state's attempts compiled (the adaptive pairs),
            :func:`vars_ode.solvers.compiled_ode.steady_attempt`), ``window``, ``t_max``, ``t_end``
            (fixed horizon), ``integrator`` (``"auto"``, ``"native"`` or ``"torchdiffeq"``; see
            :mod:`vars_ode.solvers.ode`) for ODE solvers; ``first_step``, ``growth``, ``max_step``, ``reject``,
            ``step_size`` (of a horizon), ``t_end`` for ``"implicit_euler"``
            (:mod:`vars_ode.solvers.implicit_euler`); ``rtol`` (default ``100 tol`` up to 1e-2; 3e-3 over a horizon with
            ``tol=0``, as in a layer's ``steps``: :data:`vars_ode.solvers.rkc.HORIZON_RTOL`), ``atol``,
            ``first_step``, ``max_stages``, ``step_size`` (of a horizon), ``t_end`` for ``"rkc"``
            (:mod:`vars_ode.solvers.rkc`); ``trace=[]`` collects the residual history; with ``t_end``
            and a budget of attempts (``options={"fixed_attempts": n}``, the adaptive pairs), ``forced=[]`` receives
            per problem how many times the budget's last attempt ended on a step the tolerance rejected (0 or 1,
            with ``record`` too: the codes it receives at the units of time come from a second integration).

    Returns:
        :class:`Solution` with ``code (..., m)``, ``reconstruction (..., d)``, ``output (..., d)`` and
        ``stats`` (:class:`SolverStats`, each field of the leading shape). Problems that do not converge
        come back with ``converged`` False and status ``max_iter``; problems with non-finite inputs with
        status ``nonfinite`` and a ``nan`` code, leaving the others untouched.
    """
    check_tensor("P", P, min_dim=2)
    check_tensor("x", x, min_dim=1)
    if P.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"P must be float32 or float64 for solve (cast half precision up first), got {P.dtype}")
    if x.dtype != P.dtype:
        raise ValueError(f"x must have the same dtype as P ({P.dtype}), got {x.dtype}")
    d, m = P.shape[-2:]
    if d == 0 or m == 0:
        raise ValueError(f"P must have at least one row and one atom, got shape {tuple(P.shape)}")
    check_last("x", x, d, "P.shape[-2]")
    lam_t = as_lam(lam, like=x)
    lead = check_broadcast(P=P.shape[:-2], x=x.shape[:-1], lam=lam_t.shape)
    check_choice("init", init if isinstance(init, str) else "tensor", INITS + ("tensor",))
    w = penalty_weight(lam_t, convention)
    xs = x.expand(*lead, d)
    if P.dim() == 2:
        # one dictionary, many signals: all problems are columns of one Gram system
        n = math.prod(lead)
        X = xs.reshape(n, d)
        K = P.transpose(-1, -2) @ P
        B = P.transpose(-1, -2) @ X.transpose(0, 1)
        W = w.expand(lead).reshape(1, n)
        xn2 = X.pow(2).sum(-1).reshape(1, n)
        to_cols = lambda t: t.expand(*lead, m).reshape(n, m).transpose(0, 1)  # noqa: E731
        from_cols = lambda t: t.transpose(0, 1).reshape(*lead, t.shape[0])  # noqa: E731
        from_stat = lambda t: t.reshape(lead)  # noqa: E731
    else:
        K = P.transpose(-1, -2) @ P
        B = P.transpose(-1, -2) @ xs.unsqueeze(-1)
        W = w.expand(lead).unsqueeze(-1).unsqueeze(-1)
        xn2 = xs.pow(2).sum(-1).unsqueeze(-1).unsqueeze(-1)
        to_cols = lambda t: t.expand(*lead, m).unsqueeze(-1)  # noqa: E731
        from_cols = lambda t: t.squeeze(-1)  # noqa: E731
        from_stat = lambda t: t.reshape(lead)  # noqa: E731
    if isinstance(init, torch.Tensor):
        check_tensor("init", init, min_dim=1)
        check_last("init", init, m, "P.shape[-1]")
        if not _broadcasts_to(init.shape[:-1], lead):
            raise ValueError(f"init must broadcast to the problems' shape {(*lead, m)}, got shape {tuple(init.shape)}")
        init_cols = to_cols(init.to(x.dtype))
    else:
        init_cols = init
    L = options.pop("L", None)
    if isinstance(L, torch.Tensor) and L.numel() != 1 and not _broadcasts_to(L.shape, P.shape[:-2]):
        raise ValueError(f"L must have one value per dictionary, broadcastable to P's leading dimensions "
                         f"{tuple(P.shape[:-2])}, got shape {tuple(L.shape)}")
    if L is not None and P.dim() > 2 and isinstance(L, torch.Tensor) and L.dim() > 0:
        L = L.unsqueeze(-1).unsqueeze(-1)
    sol = _solve_gram(K, B, W, solver=solver, tol=tol, max_iter=max_iter, grad=grad, lipschitz=lipschitz,
                      init=init_cols, xnorm2=xn2, implicit_solve=implicit_solve, L=L, **options)
    code = from_cols(sol.code)
    recon = (P @ code.unsqueeze(-1)).squeeze(-1)
    stats = sol.stats.map(lambda t: from_stat(t))
    return Solution(code=code, reconstruction=recon, output=recon + xs, stats=stats)


def solve_gram(K: torch.Tensor, B: torch.Tensor, lam, solver: str = "ista", *, tol: float = 1e-6,
               max_iter: int | None = None, grad: str = "unroll", convention: str = "eq10",
               lipschitz: str = "eigvalsh", init="zeros", xnorm2=None, implicit_solve: str = "direct",
               L=None, **options) -> Solution:
    """Gram-form entry: solve ``min_u 0.5 u^T K u - u^T b + w ||u||_1`` for every column ``b`` of ``B``.

    Arguments:
        K: ``(..., m, m)`` Gram matrix ``P^T P``: symmetric positive semi-definite, assumed and not checked
            (checking costs as much as a few iterations; a non-symmetric K has no LASSO behind it).
        B: ``(..., m, k)`` right-hand sides ``P^T X``, one problem per column; leading dimensions
            broadcast with ``K``'s.
        lam: float or tensor broadcastable to ``(..., 1, k)``.
        xnorm2: optional ``||x||^2`` per problem, broadcastable to ``(..., 1, k)``, so that
            ``stats.objective`` is the LASSO objective itself.
        L: optional Lipschitz constant(s), broadcastable to ``(..., 1, 1)``; computed with
            ``lipschitz`` when omitted. A given ``L`` is trusted: below ``K``'s largest eigenvalue the steps of
            ISTA and FISTA can grow without bound (ISTA's below half of it), and those problems end with status
            ``nonfinite``.
        Other arguments as in :func:`solve`; ``init`` may be a ``(..., m, k)`` tensor.

    Returns:
        :class:`Solution` with ``code (..., m, k)`` and per-problem statistics of shape ``(..., k)``.
        The number of signals' dimensions (tokens, in a layer) never enters the iteration.
    """
    check_tensor("K", K, min_dim=2)
    check_tensor("B", B, min_dim=2)
    if K.shape[-1] == 0:
        raise ValueError(f"K must have at least one atom (a non-empty last dimension), got shape {tuple(K.shape)}")
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must be square in its last two dimensions, got shape {tuple(K.shape)}")
    check_last("B", B, K.shape[-1], "K.shape[-1]", rows=True)
    lam_t = as_lam(lam, like=B)
    W = penalty_weight(lam_t, convention)
    if W.dim() > 0 and (W.dim() < 2 or W.shape[-2] != 1):
        W = W.unsqueeze(-2)
    if xnorm2 is not None and isinstance(xnorm2, torch.Tensor) and xnorm2.dim() > 0 and (xnorm2.dim() < 2 or xnorm2.shape[-2] != 1):
        xnorm2 = xnorm2.unsqueeze(-2)
    if L is not None and isinstance(L, torch.Tensor) and L.dim() > 0:
        L = L.unsqueeze(-1).unsqueeze(-1)
    return _solve_gram(K, B, W, solver=solver, tol=tol, max_iter=max_iter, grad=grad, lipschitz=lipschitz,
                       init=init, xnorm2=xnorm2, implicit_solve=implicit_solve, L=L, **options)


def check_solver(solver: str, grad: str):
    """ValueError unless ``solver`` is registered and ``grad`` is a gradient mode it allows."""
    check_choice("solver", solver, SOLVERS)
    check_choice("grad", grad, GRAD_MODES)
    if grad == "adjoint" and not SOLVERS[solver].ode:
        raise ValueError(f"grad='adjoint' needs an ODE solver (one of {[n for n, s in SOLVERS.items() if s.ode]}), "
                         f"got solver={solver!r}; use grad='unroll' or 'implicit'")


def solve_problem(op: Operator, B: tuple, w, solver: str, *, tol: float, max_iter: int, grad: str = "unroll",
                  L=None, init=None, implicit_solve: str = "cg", solution=None, gradient: bool | None = None,
                  **options):
    """Solve ``min_u 0.5 u^T K u - u^T b + w ||u||_1`` for every problem of ``op`` (no validation: the entries
    validate). Every path of the library ends here.

    Arguments:
        op: :class:`vars_ode.lasso.Operator`; B: code tuple ``b``; w: L1 weight (float or per-problem tensor).
        solver: a name of :data:`SOLVERS`; tol, max_iter: the stopping rule (``tol = 0``: the whole budget).
        grad: ``"unroll"``, ``"implicit"`` (solve without a graph, then :func:`vars_ode.gradients.implicit_code`
            with ``implicit_solve``) or ``"adjoint"`` (ODE solvers).
        L: per-problem Lipschitz bound (default ``op.lipschitz()``), detached.
        init: code tuple or ``None`` (zeros).
        options: the solver's options (``t_end`` for a fixed horizon of an ODE solver, ``record``, ...).
        solution: with ``grad="implicit"``, a code tuple that this call's solve gave before on the same problem
            (the layer's recomputed backward pass): it is not solved again, only given its implicit gradient; the
            work returned is then ``None``.
        gradient: with ``grad="implicit"``, whether a gradient will be taken of this solve, for its warnings (a
            solve short of ``tol``, a fixed budget); default: where one can be, gradients on and an input that
            requires one. The layer's recomputed equilibrium solves without a graph and attaches the gradient after.

    Returns ``(code tuple, work per problem)``.
    """
    if solution is not None:
        if grad != "implicit":
            raise ValueError(f"solution= is for grad='implicit' only, got grad={grad!r}")
        return _implicit(op, B, w, tuple(c.detach() for c in solution), implicit_solve, tol), None
    spec = SOLVERS[solver]
    if spec.needs_gram and not op.has_gram:
        raise ValueError(f"solver {solver!r} needs the Gram matrix, which {type(op).__name__} does not form "
                         "(the convolutional static atoms run in operator form); use 'ista', 'fista' or an ODE solver")
    if all(b.numel() == 0 for b in B):  # no problems (an empty batch): nothing to solve
        code = tuple(torch.zeros_like(b) if init is None else i for b, i in zip(B, init or B))
        return code, op.problems_like(tuple(B), 0, torch.long)
    if L is None:
        L = op.lipschitz() if spec.uses_lipschitz else 1.0
    L = torch.as_tensor(L).detach()
    if spec.ode:
        options["grad"] = "unroll" if grad == "implicit" else grad
    graph = [t for t in (*op.roots(), *B, w, *(init or ())) if isinstance(t, torch.Tensor) and t.requires_grad]
    graph = graph if torch.is_grad_enabled() else []
    if grad == "implicit":
        # (the warnings are about the gradient: none where no gradient can be taken, an evaluation under no_grad)
        gradient = bool(graph) if gradient is None else gradient
        if tol == 0 and gradient:
            _warn_fixed_budget()
        with torch.no_grad():
            code, iters = spec.fn(op, tuple(b.detach() for b in B), _detach(w), L,
                                  None if init is None else tuple(c.detach() for c in init),
                                  tol=tol, max_iter=max_iter, **options)
            if tol > 0 and gradient:
                _warn_short_of_equilibrium(op, code, B, w, tol)
        return _implicit(op, B, w, code, implicit_solve, tol), iters
    if graph and not spec.unrolls and grad == "unroll":
        # autograd would see no path through its iterations: the code would come back without a graph, and the
        # gradients of P, x and lam through it would be silently missing (an adjoint needs no such path)
        raise ValueError(f"solver {solver!r} has no unrolled gradient (grad='unroll' with inputs that require "
                         "gradients); use grad='implicit' (the equilibrium's gradient), or detach the inputs")
    code, work = spec.fn(op, tuple(B), w, L, None if init is None else tuple(init), tol=tol, max_iter=max_iter,
                         **options)
    if graph and not any(c.requires_grad for c in code):
        start = tuple(torch.zeros_like(b) for b in B) if init is None else tuple(init)
        if not all(torch.equal(c, s.detach().expand_as(c)) for c, s in zip(code, start)):
            raise ValueError(f"solver {solver!r} returned a code without a graph from inputs that require gradients "
                             "(grad='unroll'); a solver that autograd cannot differentiate is registered with "
                             "unrolls=False")
        # every problem stopped where it started, before an iteration (a zero code that satisfies the KKT conditions,
        # such as lam above |P^T x|): the unrolled gradient of no iterations is zero, as it is for such a problem
        # among others that iterate. A (zero) path to the inputs lets a backward pass through it work as through any
        # other solution
        link = sum(t.reshape(-1)[:0].sum() for t in graph)
        code = tuple(c + link.to(c.dtype) for c in code)
    return code, work


def _implicit(op, B, w, code, implicit_solve, tol):
    # the implicit gradient attached to a solution found without a graph; the adjoint system is solved as precisely
    # as the forward problem was (tol, relative), not more: at a layer's tol = 1e-4 the forward's own inexactness
    # moves the gradient by about 2e-4 (relative), the conjugate gradients' stop by 5e-5 more (benchmarks/RESULTS.md,
    # eighth session)
    return implicit_code(op, B, w, code, implicit_solve, cg_rtol=max(tol, default_cg_rtol(code[0].dtype)))


#: a KKT residual within this many units of the working precision (times the problem's scale) above ``tol`` counts as
#: having reached it (the solvers' own residuals and a recomputed one round differently)
ROUNDING_SLACK = 8


def _floor_allowance(op, code: tuple, B: tuple):
    # how far above tol a recomputed residual may read for a problem at the precision's floor (Status.PRECISION), or
    # None where the operator offers no bound: twice op.residual_rounding, as the solver's evaluation of the residual
    # (in the problem's units) and the recomputed one each round by up to it. A product with |K| and no host read
    rounding = op.residual_rounding(code, B)
    return None if rounding is None else 2 * rounding


def _warn_short_of_equilibrium(op, code, B, w, tol):
    # the implicit gradient is that of the equilibrium: say so when some problems did not reach it. A residual
    # within the working precision's rounding of tol counts as reached: a solver that stops at tol in float64 (cd)
    # and hands back a float32 code lands up to a few eps * |b| above it (1.00017e-4 at tol 1e-4, |b| 1.13)
    Bd = tuple(b.detach() for b in B)
    r = kkt_residual_operator(op, tuple(code), Bd, _detach(w))
    eps = torch.finfo(r.dtype).eps if r.dtype.is_floating_point else 0.0
    scale = [b.abs().amax().to(r.dtype) for b in Bd if b.numel()]  # kept on the device: no second host read
    slack = ROUNDING_SLACK * eps * torch.stack(scale).amax() if scale else 0.0
    # and a problem at the precision's floor (Status.PRECISION) has reached the equilibrium as far as the dtype tells
    floor = _floor_allowance(op, tuple(code), Bd)
    if floor is not None:
        slack = slack + floor
    short = torch.isfinite(r) & (r > tol + slack)
    n = int(short.sum())
    if n:
        warnings.warn(f"grad='implicit': {n} of {short.numel()} problems stopped above tol = {tol:g} (KKT residual up to "
                      f"{float(r[short].max()):.4g}); their gradient is that of the equilibrium, which they did not "
                      "reach: raise max_iter, or use grad='unroll'", RuntimeWarning, stacklevel=3)


def _warn_fixed_budget():
    # a fixed budget (tol = 0: a horizon, a layer's steps, the whole of max_iter) stops wherever the budget ends, and
    # nothing tells whether that is the equilibrium whose gradient the implicit mode gives
    warnings.warn("grad='implicit' with a fixed budget (tol=0, a horizon, or a layer's steps): the gradient is that of "
                  "the equilibrium, taken at the budget's last iterate, which is not checked against a tolerance; for "
                  "the equilibrium give tol > 0 (a layer: steps=None), for the budget's own gradient grad='unroll'",
                  RuntimeWarning, stacklevel=3)


def _detach(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def solve_operator(atoms: Operator, B: tuple, weight, solver: str = "ista", *, steps=3, tol: float = 0.0,
                   max_iter: int = 10_000, grad: str = "unroll", init="zeros", L=None, options: dict | None = None,
                   record: list | None = None, check_every="auto", implicit_solve: str = "cg"):
    """Solve ``min_u 0.5 ||P u - x||^2 + weight ||u||_1`` per problem with ``P`` given as an operator (a
    layer's bound dictionary, :class:`vars_ode.dictionaries.Atoms`, or any :class:`vars_ode.lasso.Operator`).

    Arguments:
        atoms: the operator. B: code tuple ``P^T x``. weight: the L1 weight, a float or a per-problem tensor.
        solver: any name of :data:`SOLVERS` (ODE solvers integrate Eq. 8-9 rescaled by ``L``, so one unit of
            time is about one ISTA step).
        steps: iterations (ista / fista), or the integration horizon (ODE); ``None`` iterates until the
            KKT residual is at most ``tol`` or ``max_iter`` iterations / evaluations are spent.
        grad: ``"unroll"``, ``"implicit"`` (conjugate gradients with the operator) or ``"adjoint"`` (ODE).
        init: ``"zeros"``, ``"encode"`` (``u0 = P^T x``) or a code tuple.
        L: per-problem Lipschitz bound (default ``atoms.lipschitz()``); detached.
        options: the solver's options (``rtol``, ``atol``, ``options``, ``integrator``, ... for ODE solvers;
            ``restart`` for fista, ``metric`` for ista / fista / active_set).
        record: a list that receives the (detached) code after every iteration / unit of time.
        check_every: residual checks of ista / fista when solving to ``tol``.

    Returns:
        ``(code tuple, iterations)``; ``iterations`` is a 0-dim long tensor (the largest over the problems).
    """
    check_solver(solver, grad)
    options = dict(options or {})
    spec = SOLVERS[solver]
    if isinstance(init, str):
        check_choice("init", init, INITS)
        init = None if init == "zeros" else tuple(B)
    if record is not None:
        options["record"] = record
    if steps is not None:
        if spec.ode:
            options["t_end"] = steps
            budget = dict(tol=0.0, max_iter=max_iter)
        else:
            budget = dict(tol=0.0, max_iter=int(steps))
    else:
        budget = dict(tol=tol, max_iter=max_iter)
        if solver in ("ista", "fista"):
            options.setdefault("check_every", check_every)
    code, iters = solve_problem(atoms, tuple(B), weight, solver, grad=grad, L=L, init=init,
                                implicit_solve=implicit_solve, **budget, **options)
    return tuple(code), iters.amax()


def _broadcasts_to(shape, want) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``want`` without enlarging it."""
    if len(shape) > len(want):
        return False
    try:
        return tuple(torch.broadcast_shapes(shape, want)) == tuple(want)
    except RuntimeError:
        return False


def _solve_gram(K, B, W, *, solver, tol, max_iter, grad, lipschitz, init, xnorm2, implicit_solve, L, **options):
    check_solver(solver, grad)
    check_choice("lipschitz", lipschitz, LIPSCHITZ_METHODS)
    check_choice("implicit_solve", implicit_solve, IMPLICIT_SOLVES)
    if "convention" in options:
        check_choice("convention", options.pop("convention"), CONVENTIONS)
    if options.get("trace") is not None and not isinstance(options["trace"], list):
        raise ValueError(f"trace must be a list, which receives the residual history (trace=[]), or None, got "
                         f"{options['trace']!r}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
        raise ValueError(f"tol must be a non-negative float, got {tol!r}")
    spec = SOLVERS[solver]
    if max_iter is None:
        max_iter = spec.max_iter
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if K.dtype not in SOLVE_DTYPES or B.dtype != K.dtype:
        raise ValueError(f"K and B must both be float32 or both float64 (cast half precision up first), got "
                         f"{K.dtype} and {B.dtype}")
    try:
        cols = torch.broadcast_shapes(K.shape[:-2], B.shape[:-2], W.shape[:-2]) + (1, B.shape[-1])
        torch.broadcast_shapes(W.shape, cols)
    except RuntimeError:
        raise ValueError(f"lam must broadcast to the problems (..., 1, k) = {(*K.shape[:-2], 1, B.shape[-1])} of K "
                         f"{tuple(K.shape)} and B {tuple(B.shape)}, got shape {tuple(W.shape)}") from None
    if L is not None:
        if not isinstance(L, torch.Tensor) and not (isinstance(L, (int, float)) and not isinstance(L, bool)):
            raise ValueError(f"L must be a positive float or tensor, got {type(L).__name__}")
        Lt = torch.as_tensor(L)
        if not bool((torch.isfinite(Lt) & (Lt > 0)).all()):
            raise ValueError(f"L must be finite and positive, got values in [{Lt.min().item():g}, {Lt.max().item():g}]")
        if Lt.dim() and not _broadcasts_to(Lt.shape, cols[:-2] + (1, 1)):
            raise ValueError(f"L must have one value per dictionary, broadcastable to K's leading dimensions "
                             f"{tuple(cols[:-2])}, got shape {tuple(Lt.shape[:-2])}")
    for name, t, want in (("xnorm2", xnorm2, cols), ("init", init, cols[:-2] + B.shape[-2:])):
        if isinstance(t, torch.Tensor) and not _broadcasts_to(t.shape, want):
            raise ValueError(f"{name} must broadcast to {tuple(want)}, got shape {tuple(t.shape)}")

    # Problems with non-finite inputs are replaced by harmless ones and reported, so they
    # cannot disturb the others (adaptive ODE step control sees the whole batch).
    W = torch.as_tensor(W, dtype=B.dtype, device=B.device)
    # a finite sum of K means every entry is finite (one pass over the largest input instead of several); where a
    # sum is not, every entry is checked (a sum may overflow with finite entries)
    finite_B = torch.isfinite(B).all(-2, keepdim=True) & torch.isfinite(W)
    finite_K = torch.isfinite(K.sum((-1, -2), keepdim=True))
    all_finite = bool((finite_B & finite_K).all())
    if not all_finite:
        finite_K = torch.isfinite(K).all(-1, keepdim=True).all(-2, keepdim=True)
        all_finite = bool((finite_B & finite_K).all())
    finite = finite_B & finite_K
    if not all_finite:
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        K = torch.where(finite_K, K, eye)
        B = torch.where(finite, B, torch.zeros((), dtype=B.dtype, device=B.device))
        W = torch.where(torch.isfinite(W), W, torch.zeros((), dtype=B.dtype, device=B.device))
    Wf = W.expand(cols)
    Bf = B.expand(cols[:-2] + B.shape[-2:])
    op = GramOperator(K)
    if L is None:
        L = _gram_lipschitz(op, spec, lipschitz, tol, options.get("metric", "auto"))
    L = torch.as_tensor(L, dtype=B.dtype, device=B.device).detach()
    L = L.clamp_min(torch.finfo(B.dtype).tiny) if L.dim() else L
    L = torch.where(torch.isfinite(L), L, torch.ones((), dtype=L.dtype, device=L.device))

    # the start keeps its graph: an unrolled gradient of a budget or a horizon depends on it (init="encode" is P^T x;
    # detached, vo.solve(P, x, lam, "ista", tol=0, max_iter=3, init="encode") missed 87% of its gradient in P).
    # solve_problem detaches it for the implicit gradient, whose equilibrium does not depend on it
    if isinstance(init, str):
        u0 = None if init == "zeros" else (Bf.clone(),)
    else:
        u0 = (torch.where(finite, init.expand(Bf.shape), torch.zeros((), dtype=B.dtype, device=B.device)),)

    # per-problem tensors in the problems' shape (..., k); L broadcasts over the columns
    w = Wf.squeeze(-2)
    Lp = L.squeeze(-1) if L.dim() >= 2 else L
    # the tolerance is relative to each problem's scale (lasso.tol_scale): a problem with ||b||_inf = s > 1 is
    # solved in units of s (b / s, w / s: the code scales by 1 / s, and so does its KKT residual), then scaled back
    scale = tol_scale(op, (Bf,)).unsqueeze(-2) if tol > 0 else None
    if scale is not None and not bool((scale > 1).any()):
        scale = None  # all problems at unit scale or below: the tolerance is absolute, nothing to rescale
    if scale is None:
        code, iters = solve_problem(op, (Bf,), w, solver, tol=tol, max_iter=max_iter, grad=grad, L=Lp, init=u0,
                                    implicit_solve=implicit_solve, **options)
        code = code[0]
    else:
        code, iters = solve_problem(op, (Bf / scale,), w / scale.squeeze(-2), solver, tol=tol, max_iter=max_iter,
                                    grad=grad, L=Lp, init=None if u0 is None else (u0[0] / scale,),
                                    implicit_solve=implicit_solve, **options)
        code = code[0] * scale

    with torch.no_grad():
        cd = code.detach()
        Kc = op.gram_apply((cd,))[0]  # K u as the solvers took it (the same rounding)
        residual = kkt_violation(Kc - Bf.detach(), cd, Wf.detach()).amax(dim=-2)
        quad = 0.5 * (cd * Kc).sum(-2) - (cd * Bf.detach()).sum(-2)
        l1 = (Wf.detach() * cd.abs()).sum(-2)
        const = torch.full_like(quad, math.nan) if xnorm2 is None else 0.5 * torch.as_tensor(
            xnorm2, dtype=B.dtype, device=B.device).expand(cols).squeeze(-2)
        objective = quad + l1 + const
        nnz = (cd != 0).sum(-2)
        ok = finite.squeeze(-2) & torch.isfinite(residual)
        # within the working precision's rounding of tol counts as reached: the solvers stop on their own residual of
        # b / s, and the code scaled back by s reads up to about 0.5% above tol * s in float32 (at tol 1e-5, 3 of
        # 300 problems that stopped after 64-76 of 10,000 iterations were reported as short of tol before)
        reach = (tol + ROUNDING_SLACK * torch.finfo(residual.dtype).eps) * tol_scale(op, (Bf,))
        converged = ok & (residual <= reach)
        status = torch.full(converged.shape, int(Status.MAX_ITER), dtype=torch.long, device=B.device)
        if tol > 0 and options.get("t_end") is None:
            # short of tol by no more than rounding: the precision's floor, not the budget (float32 at tol 1e-5 on 300
            # positive dictionaries of 196 x 128: terms of 50-140, eps times them 0.6-1.7e-5; 5-18 problems stopped at
            # 1.1-1.5e-5, their float64 residual 0.75-1.16e-5; RESULTS.md, thirtieth session). 0.6-1.8% of a
            # per-problem solve
            floor = residual <= reach + _floor_allowance(op, (cd,), (Bf.detach(),))
            status = torch.where(floor, torch.full_like(status, int(Status.PRECISION)), status)
        status = torch.where(converged, torch.full_like(status, int(Status.CONVERGED)), status)
        status = torch.where(ok, status, torch.full_like(status, int(Status.NONFINITE)))
    if not all_finite:
        code = torch.where(finite, code, torch.full((), math.nan, dtype=code.dtype, device=code.device))
        residual = torch.where(finite.squeeze(-2), residual, torch.full_like(residual, math.nan))
    stats = SolverStats(iterations=iters.expand(converged.shape), residual=residual, objective=objective,
                        nnz=nnz, converged=converged, status=status, solver=solver, unit=spec.unit,
                        trace=options.get("trace") or [])
    return Solution(code=code, reconstruction=None, output=None, stats=stats)


def _gram_lipschitz(op: GramOperator, spec, lipschitz: str, tol: float, metric) -> torch.Tensor:
    """``L`` of a Gram-form problem, ``(..., 1, 1)``: by ``lipschitz``; or, for a solver that steps in a metric
    (``SolverSpec.uses_metric``; :func:`vars_ode.solvers.iterative.resolve_metric`: the operator's own to a tolerance
    where ``K`` offers one, or one given), the metric's bound (``lambda_1`` of the eigendecomposition it is made of,
    which the solver asks for anyway): such a solver reads ``L`` only where it has no metric, and ``eigvalsh`` would
    cost as much again (300 dictionaries of 128 atoms: 0.16 s)."""
    if not spec.uses_lipschitz:
        return torch.ones((), dtype=op.K.dtype, device=op.K.device)
    m = resolve_metric(op, tol, metric) if spec.uses_metric else None
    if m is not None:
        return m.bound().unsqueeze(-1)
    return lipschitz_constant(op.K.detach(), lipschitz).unsqueeze(-1).unsqueeze(-1)
