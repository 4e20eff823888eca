"""Gradients through the LASSO solution.

Three ways, chosen by ``solve(..., grad=...)``:

* ``"unroll"``: autograd records every iteration (exact for the computation performed; memory
  grows with the number of iterations).
* ``"implicit"``: the solution ``u*`` of ``min 0.5 u^T K u - u^T b + w ||u||_1`` satisfies, on its
  active set ``S``, ``K_SS u*_S = b_S - w sign(u*_S)``, and ``u*`` is zero off ``S``. Differentiating
  this identity gives the gradient at the fixed point with one linear solve, whatever the number of
  iterations: with ``v_S = K_SS^{-1} g_S`` (``g`` the incoming gradient) and ``v`` zero off ``S``,
  ``dL/db = v``, ``dL/dK = -v u*^T`` and ``dL/dw = -v . sign(u*)``. Taken where the solve stopped: a
  ``RuntimeWarning`` when problems stopped above ``tol``, and over a fixed budget (``tol = 0``, a horizon, a
  layer's ``steps``), which no tolerance checks.
* ``"adjoint"`` (ODE solvers only): on an operator with a Gram matrix the discrete adjoint of the native
  integration (:mod:`vars_ode.solvers.gram_ode`: one state kept per step); elsewhere torchdiffeq's adjoint method,
  over a fixed horizon only (:func:`vars_ode.solvers.ode.choose_integrator`).

The implicit gradient of any :class:`vars_ode.lasso.Operator` (:func:`implicit_code`) needs no matrix: ``v``
solves ``(D K D + I - D) v = D g`` by conjugate gradients with the operator (``D`` the support mask), and
the gradients of ``K``'s own inputs (a layer's features and templates), of ``b`` and of ``w`` come from
one differentiable application of the operator, ``F = b - K u* - w sign(u*)``, back-propagated with ``v``.
Memory does not depend on the number of iterations the solve took.
"""
from __future__ import annotations

import torch

from .lasso import GramOperator, Operator, tmap
from .ops import support_solve, support_system

#: the gradient modes, with what each needs
GRAD_MODES = {
    "unroll": "autograd through every iteration or stage",
    "implicit": "the implicit function theorem at the solution (on its active set)",
    "adjoint": "the adjoint of the ODE integration (ODE solvers only): the native integration's discrete adjoint, "
               "or torchdiffeq's continuous one with integrator='torchdiffeq' (over a fixed horizon only)",
}
IMPLICIT_SOLVES = ("direct", "cg")


def _support_solve(K, D, R):
    """``V`` with ``(D K D + I - D) V = R`` column by column (``D``: ``(..., m, k)`` support masks), by a batched
    Cholesky factorisation of each support block (:func:`vars_ode.ops.support_solve`); a column whose system is
    singular to working precision (a singular ``K_SS``: atoms on the support that are linearly dependent) takes the
    least-squares solution of minimum norm (``pinv``).

    Cholesky rather than LU: ``torch.linalg.solve`` on batches of 160 x 160 and larger systems stopped in MKL's
    ``SLASWP`` ("Parameter 6 was incorrect on entry") and never returned with two threads, torch 2.14.1 on the
    project's CPU (``vo.solve`` of a 300 x 192 dictionary with ``grad="implicit"``)."""
    V, ok = support_solve(K, D, R)
    # an exactly singular K_SS often factorises with a pivot of rounding size: ``ok`` checks the pivots too
    bad = ~ok
    if bool(bad.any()):
        M = support_system(K, D)
        r = R.transpose(-1, -2).unsqueeze(-1).expand(*M.shape[:-1], 1)
        Vt = V.transpose(-1, -2).clone()
        Vt[bad] = (torch.linalg.pinv(M[bad]) @ r[bad]).squeeze(-1)
        V = Vt.transpose(-1, -2)
    return V


class ImplicitLasso(torch.autograd.Function):
    """``code = ImplicitLasso.apply(K, B, w, code_star, method, cg_iters)``: identity in the forward
    pass, implicit differentiation of the LASSO fixed point in the backward pass.

    Shapes: ``K`` ``(..., m, m)``, ``B`` and ``code_star`` ``(..., m, k)``, ``w`` ``(..., 1, k)``.
    """

    @staticmethod
    def forward(ctx, K, B, w, code, method="direct", cg_iters=500):
        ctx.save_for_backward(K, code)
        ctx.method, ctx.cg_iters = method, cg_iters
        ctx.shapes = (K.shape, B.shape, w.shape)
        return code.clone()

    @staticmethod
    def backward(ctx, G):
        K, code = ctx.saved_tensors
        Kshape, Bshape, wshape = ctx.shapes
        D = torch.sign(code).abs_().to(G.dtype)  # the support mask as 0 / 1 (no boolean pass)
        rhs = D * G
        if ctx.method == "cg":
            (V,) = _operator_cg(GramOperator(K), (D,), (rhs,), ctx.cg_iters, default_cg_rtol(G.dtype))
        else:
            V = _support_solve(K, D, rhs)
        gK = -(V @ code.transpose(-1, -2))
        gw = -(V * torch.sign(code)).sum(-2, keepdim=True)
        gB = V
        return gK.sum_to_size(Kshape), gB.sum_to_size(Bshape), gw.sum_to_size(wshape), None, None, None


@torch.no_grad()
def _operator_cg(op: Operator, D: tuple, R: tuple, iters: int, rtol: float, check_every: int = 8,
                 patience: int = 4) -> tuple:
    """Conjugate gradients for ``(D K D + I - D) X = R`` per problem, ``K`` applied by ``op``; ``D`` masks, and ``R``
    zero where ``D`` is (as ``X`` then is).

    A problem stops (its iterate is frozen) once its residual is ``rtol`` times its first; the iterate
    returned per problem is the one of smallest true residual ``||R - A X||`` seen at a check (every
    ``check_every`` iterations, one product more). The loop ends when every problem
    has stopped, or after ``iters`` iterations. A problem also stops when its residual has not halved for
    ``patience`` checks: with a rank-deficient ``K`` (more atoms than tokens) some supports make the system
    nearly singular, where CG in float32 stalls and then diverges instead of converging (measured on a
    4-layer VARS-D ViT: 500 iterations in every backward pass, residuals 80x the right-hand side's)."""
    # runs without a graph (the backward of an implicit gradient), so the iterates are updated in place: an
    # iteration is one product and about eight element-wise passes, which cost as much as the product when each
    # allocates (benchmarks/RESULTS.md, eighth session)
    def apply(V):
        # (D K D + I - D) V = D K V for the V of this loop: R is zero off the support, and so is every
        # combination of it (X, the residuals, the directions), exactly
        return tuple(_owned(k, v).mul_(d) for d, k, v in zip(D, op.gram_apply(V), V))

    def dot(a, b):
        return sum(op.reduce(i, x * y) for i, (x, y) in enumerate(zip(a, b)))

    def per_block(t):
        return tuple(op.expand(i, t) for i in range(op.num_blocks))

    def true_rs(V):
        res = tuple(av.sub_(r) for r, av in zip(R, apply(V)))  # A V - R: the same norm
        return dot(res, res)

    X = tuple(torch.zeros_like(r) for r in R)
    Rk = tuple(r.clone() for r in R)
    Pk = tuple(r.clone() for r in R)
    rs = dot(Rk, Rk)
    tiny = torch.finfo(rs.dtype).tiny
    stop = (rtol * rtol) * rs.clamp_min(tiny)
    running = rs > stop
    best_rs, best_X = rs.clone(), tuple(x.clone() for x in X)  # X changes in place
    ref_rs = rs.clone()  # per problem: the residual at its last halving
    stalled = torch.zeros_like(rs, dtype=torch.long)
    iters_done = 0
    for it in range(iters):
        iters_done = it + 1
        AP = apply(Pk)
        denom = dot(Pk, AP)
        alpha = torch.where(running & (denom > 0), rs / denom.clamp_min(tiny), torch.zeros_like(rs))
        for x, ai, p, r, ap in zip(X, per_block(alpha), Pk, Rk, AP):
            x.addcmul_(ai, p)
            r.addcmul_(ai, ap, value=-1)
        rs_new = torch.where(running, dot(Rk, Rk), rs)
        if iters_done % check_every == 0:
            # judged by the true residual: in float32 the recurrence's drifts from it on near-singular systems
            true = true_rs(X)
            better = true < best_rs
            best_X = tuple(torch.where(m, x, bx) for m, x, bx in zip(per_block(better), X, best_X))
            best_rs = torch.where(better, true, best_rs)
            halved = true <= 0.25 * ref_rs
            ref_rs = torch.where(halved, true, ref_rs)
            stalled = torch.where(halved, torch.zeros_like(stalled), stalled + 1)
            running = running & (true > stop) & (stalled < patience)
            if not bool(running.any()):
                break
        b = torch.where(running, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        for p, bi, r in zip(Pk, per_block(b), Rk):
            p.mul_(bi).add_(r)
        rs = rs_new
    if iters_done % check_every:  # the last iterate, when the loop ended between two checks
        true = true_rs(X)
        best_X = tuple(torch.where(m, x, bx) for m, x, bx in zip(per_block(true < best_rs), X, best_X))
    return best_X


def _owned(t, source):
    # t, or a copy where it shares memory with source (an operator that returns its input, as the identity would)
    return t.clone() if t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr() else t


def default_cg_rtol(dtype) -> float:
    """The residual, relative to the right-hand side's, at which conjugate gradients stop by default: 1e-10 in
    float64, 1e-5 in float32 (the floor below which float32 CG stalls). A solve to a tolerance ``tol`` asks for
    ``max(tol, default_cg_rtol(dtype))`` (:func:`vars_ode.solvers.solve_problem`)."""
    return 1e-10 if dtype == torch.float64 else 1e-5


class _ImplicitAdjoint(torch.autograd.Function):
    """Zeros forward; backward maps the incoming gradient ``g`` of ``u*`` to ``v`` (the adjoint solve)."""

    @staticmethod
    def forward(ctx, solve, *F):
        ctx.solve = solve
        return tuple(torch.zeros_like(f) for f in F)

    @staticmethod
    def backward(ctx, *G):
        G = tuple(torch.zeros(()) if g is None else g for g in G)
        return (None, *ctx.solve(G))


def implicit_code(op: Operator, B: tuple, w, code: tuple, method: str = "cg", *, cg_iters: int = 500,
                  cg_rtol: float | None = None) -> tuple:
    """``code`` (a solution computed without gradients) made differentiable at the fixed point.

    Arguments:
        op: the operator, with the autograd graph of its inputs; B: ``b`` (code tuple, with its graph);
        w: the L1 weight (float or per-problem tensor); code: the solution.
        method: ``"cg"`` (conjugate gradients with ``op``; any operator) or ``"direct"`` (a Cholesky solve of each
            problem's support block, for operators with a Gram matrix).
        cg_iters, cg_rtol: the conjugate gradients' budget and relative stopping residual (default
            :func:`default_cg_rtol`).

    Returns the code tuple, equal to ``code``, whose gradient is the implicit one.
    """
    code = tuple(c.detach() for c in code)
    D = tuple(torch.sign(c).abs_() for c in code)  # support masks, 0 / 1 (no boolean pass)
    if method == "direct" and not op.has_gram:
        raise ValueError(f"implicit_solve='direct' needs a Gram matrix, which {type(op).__name__} does not form; "
                         "use implicit_solve='cg'")
    dtype = code[0].dtype
    rtol = cg_rtol if cg_rtol is not None else default_cg_rtol(dtype)
    Kd = op.gram().detach() if method == "direct" else None

    def solve(G):
        with torch.no_grad():
            R = tuple(d * g for d, g in zip(D, G))
            if method == "direct":
                V = (_support_solve(Kd, D[0], R[0]),)
            else:
                V = _operator_cg(op, D, R, cg_iters, rtol)
            return tuple(d * v for d, v in zip(D, V))

    with torch.enable_grad():
        Ku = op.gram_apply(code)
        F = tuple(b - k - op.expand(i, w) * torch.sign(c) for i, (b, k, c) in enumerate(zip(B, Ku, code)))
        if not any(f.requires_grad for f in F):
            return code
        zeros = _ImplicitAdjoint.apply(solve, *F)
    return tuple(c + z for c, z in zip(code, zeros))
