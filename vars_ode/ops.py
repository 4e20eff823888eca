"""Elementary operations of sparse reconstruction.

Conventions
-----------
The paper writes the LASSO of a VARS layer in two ways that differ by a factor of two:
Eq. 10 (main text) penalises ``lam * ||u||_1`` and thresholds at ``lam / 2`` in the dynamics;
Eq. 16, 22 and 24 (appendix) penalise ``2 lam * ||u||_1`` and threshold at ``lam``. vars_ode
follows Eq. 10 by default (``convention="eq10"``); ``convention="eq22"`` gives the other one
everywhere a ``lam`` is accepted. :func:`penalty_weight` turns a ``lam`` into the weight on the
L1 norm under either convention.

Shapes: a dictionary ``P`` is ``(..., d, m)`` (``m`` atoms of dimension ``d``), a signal ``x`` is
``(..., d)`` and a code is ``(..., m)``; leading dimensions broadcast.
"""
from __future__ import annotations

import math

import torch

from ._validation import as_lam, check_broadcast, check_choice, check_last, check_tensor

CONVENTIONS = ("eq10", "eq22")
LIPSCHITZ_METHODS = ("eigvalsh", "power", "official")


def penalty_weight(lam, convention: str = "eq10"):
    """Weight on ``||code||_1`` for a given ``lam``: ``lam`` (Eq. 10) or ``2 lam`` (Eq. 22/24)."""
    check_choice("convention", convention, CONVENTIONS)
    return lam if convention == "eq10" else 2 * lam


def soft_threshold(x: torch.Tensor, threshold) -> torch.Tensor:
    """``sign(x) * max(|x| - threshold, 0)``, element-wise (the paper's ``S_lambda`` and ``g``).

    ``threshold`` is a float or a tensor broadcastable to ``x``; it must be non-negative.
    Differentiable in both arguments.
    """
    check_tensor("x", x)
    if isinstance(threshold, torch.Tensor):
        check_tensor("threshold", threshold)
        check_broadcast("shapes", x=x.shape, threshold=threshold.shape)
        if bool((threshold < 0).any()):
            raise ValueError(f"threshold must be non-negative, got a minimum of {threshold.min().item():g}")
        return _soft(x, threshold)
    return _soft(x, as_lam(threshold, like=x, name="threshold"))


def _soft(x: torch.Tensor, thr, out: torch.Tensor | None = None) -> torch.Tensor:
    # sign(x) * relu(|x| - thr) without validation, for hot loops: x - clamp(x, -thr, thr), two kernels, or for a
    # float threshold softshrink, one; the same values bit for bit (x - thr is |x| - thr with the sign of x) and
    # the same gradients. ``out`` (not for autograd): the tensor to write into
    if isinstance(thr, float) and thr >= 0:
        return torch.nn.functional.softshrink(x, thr) if out is None else torch.ops.aten.softshrink.out(x, thr, out=out)
    if out is None:
        return x - torch.clamp(x, -thr, thr)
    return torch.sub(x, torch.clamp(x, -thr, thr, out=out), out=out)


def lasso_objective(P: torch.Tensor, code: torch.Tensor, x: torch.Tensor, lam, *, convention: str = "eq10") -> torch.Tensor:
    """``0.5 ||P code - x||^2 + w ||code||_1`` per problem, with ``w = penalty_weight(lam, convention)``.

    Arguments:
        P: ``(..., d, m)`` dictionary.
        code: ``(..., m)``.
        x: ``(..., d)`` signal.
        lam: float or tensor broadcastable to the leading dimensions.

    Returns:
        ``(...)`` objective values (Eq. 10, or Eq. 22 with ``convention="eq22"``).
    """
    w = penalty_weight(_check_problem(P, code, x, lam), convention)
    resid = (P @ code.unsqueeze(-1)).squeeze(-1) - x
    return 0.5 * resid.pow(2).sum(-1) + w * code.abs().sum(-1)


def gram(P: torch.Tensor, x: torch.Tensor | None = None):
    """``K = P^T P`` and, when ``x`` is given, ``b = P^T x``: all a solver needs."""
    check_tensor("P", P, min_dim=2)
    if x is not None:
        check_tensor("x", x, min_dim=1)
        check_last("x", x, P.shape[-2], "P.shape[-2]")
        check_broadcast(P=P.shape[:-2], x=x.shape[:-1])
    K = P.transpose(-1, -2) @ P
    if x is None:
        return K
    b = (P.transpose(-1, -2) @ x.unsqueeze(-1)).squeeze(-1)
    return K, b


def kkt_residual_gram(K: torch.Tensor, B: torch.Tensor, code: torch.Tensor, weight) -> torch.Tensor:
    """Optimality residual in Gram form; columns of ``B`` and ``code`` are problems.

    ``K``: ``(..., m, m)``; ``B``, ``code``: ``(..., m, k)``; ``weight`` broadcastable to
    ``(..., 1, k)``. Returns ``(..., k)``: the infinity norm of the minimum-norm subgradient of
    ``0.5 u^T K u - u^T b + weight ||u||_1``, zero exactly at a minimiser.
    """
    for name, t in (("K", K), ("B", B), ("code", code)):
        check_tensor(name, t, min_dim=2)
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must be square in its last two dimensions, got shape {tuple(K.shape)}")
    check_last("B", B, K.shape[-1], "K.shape[-1]", rows=True)
    check_last("code", code, K.shape[-1], "K.shape[-1]", rows=True)
    check_broadcast(K=K.shape[:-2], B=B.shape[:-2], code=code.shape[:-2])
    check_broadcast("the problems (columns)", B=B.shape[-1:], code=code.shape[-1:])
    return _kkt_residual_gram(K, B, code, weight)


def _kkt_residual_gram(K, B, code, weight):
    # kkt_residual_gram without its checks: for callers whose arguments are checked already (kkt_residual, a layer's
    # statistics)
    return kkt_violation(K @ code - B, code, weight).amax(dim=-2)


def kkt_violation(grad: torch.Tensor, code: torch.Tensor, weight, *, buffers: tuple | None = None) -> torch.Tensor:
    """Element-wise violation of the LASSO's optimality conditions, from the gradient ``grad`` of the smooth part:
    ``|grad + w sign(u)|`` where ``u != 0``, ``max(|grad| - w, 0)`` where ``u = 0`` (``weight`` a float or a
    tensor broadcastable to ``code``).

    Written without a branch, as ``|grad + w s| - (1 - |s|) min(|grad|, w)`` with ``s = sign(u)``: equal to the
    two cases to the last bit (a term is multiplied by exactly 0 or 1), and on the CPU a third of the cost of
    ``torch.where`` on the data-dependent mask ``u != 0`` (benchmarks/RESULTS.md, eighth session). An infinite
    ``w`` enters the first term as the largest finite number, so that ``0 * w`` stays 0.

    ``buffers``: three tensors shaped like ``code`` (outside autograd) that receive the result (the first) and the
    work, instead of three new tensors (a large CPU code's page faults cost several times the arithmetic: a solver's
    residual check on the convolutional templates' code 8 -> 2 ms, benchmarks/RESULTS.md, twenty-sixth session).
    The same operations, so the same values; ``grad`` and ``code`` are not written."""
    big = torch.finfo(grad.dtype).max
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (grad, code, weight)):
        s = torch.sign(code)
        if isinstance(weight, torch.Tensor):
            on, off = (grad + weight.clamp(max=big) * s).abs(), torch.minimum(grad.abs(), weight)
        else:
            on, off = torch.add(grad, s, alpha=min(float(weight), big)).abs(), grad.abs().clamp(max=float(weight))
        return on - off * (1 - s.abs())
    # the same operations in temporaries (nothing to record): new ones, or the caller's buffers
    R, S, O = (None, None, None) if buffers is None else buffers
    s = torch.sign(code, out=S)
    if isinstance(weight, torch.Tensor):
        on = torch.mul(weight.clamp(max=big), s, out=R).add_(grad).abs_()  # grad + w s: the sum commutes, same bits
        off = torch.minimum(torch.abs(grad, out=O), weight, out=O)
    else:
        on = torch.add(grad, s, alpha=min(float(weight), big), out=R).abs_()
        off = torch.abs(grad, out=O).clamp_(max=float(weight))
    return on.sub_(off.mul_(s.abs_().neg_().add_(1)))


def kkt_residual(P: torch.Tensor, code: torch.Tensor, x: torch.Tensor, lam, *, convention: str = "eq10") -> torch.Tensor:
    """KKT residual of ``code`` for the LASSO of :func:`lasso_objective`, per problem ``(...)``.

    It is the largest violation of the optimality conditions ``-(P^T(P u - x))_i = w sign(u_i)`` where
    ``u_i != 0`` and ``|(P^T(P u - x))_i| <= w`` where ``u_i = 0``.
    """
    w = penalty_weight(_check_problem(P, code, x, lam), convention)
    Pt = P.transpose(-1, -2)
    if isinstance(w, torch.Tensor):
        w = w.unsqueeze(-1).unsqueeze(-1)
    return _kkt_residual_gram(Pt @ P, Pt @ x.unsqueeze(-1), code.unsqueeze(-1), w).squeeze(-1)


def _check_problem(P, code, x, lam) -> torch.Tensor:
    # the arguments of lasso_objective and kkt_residual, checked; returns lam as a tensor
    check_tensor("P", P, min_dim=2)
    check_tensor("code", code, min_dim=1)
    check_tensor("x", x, min_dim=1)
    check_last("code", code, P.shape[-1], "P.shape[-1]")
    check_last("x", x, P.shape[-2], "P.shape[-2]")
    lam_t = as_lam(lam, like=code)
    check_broadcast(P=P.shape[:-2], code=code.shape[:-1], x=x.shape[:-1], lam=lam_t.shape)
    return lam_t


def by_rows(M: torch.Tensor, X: torch.Tensor) -> bool:
    """Whether ``M @ X``, for a batch of symmetric matrices ``M``, is better taken as ``(X^T M)^T``: one float32 column
    per matrix on a CPU, where a row times a batch of matrices reads them in their memory order and runs 3.4x faster
    than the batched matrix-vector product (300 matrices of 128 x 128: 2.42 -> 0.71 ms; a solve per problem
    1.3-2.4x). In float64 the two take about the same time in a solve, so float64 keeps ``M @ X`` and its rounding
    (benchmarks/RESULTS.md, twenty-ninth session). Not where ``M`` requires a gradient, with or without a graph
    being recorded: that of ``X^T M`` is the transpose of ``M X``'s (equal only after the symmetry is used), and a
    solve and the check of its result must round alike. With one column the transposes are views of the same
    memory."""
    return (X.shape[-1] == 1 and X.dim() >= 2 and X.dtype == torch.float32 and X.device.type == "cpu"
            and not M.requires_grad)


def symmetric_matmul(M: torch.Tensor, X: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``M @ X`` for a batch of symmetric matrices ``M`` (into ``out`` when given), by rows where :func:`by_rows`
    says so."""
    if by_rows(M, X):
        return torch.matmul(X.mT, M, out=None if out is None else out.mT).mT
    return torch.matmul(M, X, out=out)


def lipschitz_constant(K: torch.Tensor, method: str = "eigvalsh", *, iters: int = 50, v0: torch.Tensor | None = None) -> torch.Tensor:
    """Lipschitz constant of the gradient of ``0.5 ||P u - x||^2``: the largest eigenvalue of ``K = P^T P``.

    Arguments:
        K: ``(..., m, m)`` symmetric positive semi-definite Gram matrix.
        method: ``"eigvalsh"`` (exact), ``"power"`` (``iters`` steps of power iteration, a lower
            bound that converges to the exact value) or ``"official"`` (the official VARS code's
            upper bound: the largest absolute row sum of ``K``, plus one).
        v0: optional ``(..., m)`` starting vector for the power iteration.

    Returns:
        ``(...)`` tensor.
    """
    check_tensor("K", K, min_dim=2)
    check_choice("method", method, LIPSCHITZ_METHODS)
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"K must be square in its last two dimensions, got shape {tuple(K.shape)}")
    if method == "eigvalsh":
        work = K if K.dtype in (torch.float32, torch.float64) else K.float()
        return torch.linalg.eigvalsh(work)[..., -1].to(K.dtype)
    if method == "official":
        return K.abs().sum(-1).amax(-1) + 1
    # row vectors: v^T K = (K v)^T for the symmetric K, and a row times a batch of matrices reads them in their
    # memory order (7x faster than K v for 24 matrices of 128 x 128 on a CPU: benchmarks/RESULTS.md,
    # twenty-sixth session)
    m = K.shape[-1]
    if v0 is None:
        v = torch.ones(K.shape[:-2] + (1, m), dtype=K.dtype, device=K.device) / m**0.5
    else:
        check_tensor("v0", v0, min_dim=1)
        check_last("v0", v0, m, "K.shape[-1]")
        if tuple(check_broadcast(K=K.shape[:-2], v0=v0.shape[:-1])) != tuple(K.shape[:-2]):
            raise ValueError(f"v0 must broadcast to K's leading dimensions {tuple(K.shape[:-2])}, got shape "
                             f"{tuple(v0.shape)}")
        v = v0.unsqueeze(-2).expand(K.shape[:-2] + (1, m)).clone()
    for _ in range(iters):
        v = v @ K
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(K.dtype).tiny)
    return ((v @ K) * v).sum((-2, -1))


def support_system(K: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``D_j K D_j + (I - D_j)`` for every column ``j`` of a support mask: the linear system of the
    LASSO restricted to each problem's active set (identity off it).

    ``K``: ``(..., m, m)``; ``mask``: ``(..., m, k)`` (non-zero where active). Returns ``(..., k, m, m)``.
    """
    Dt = mask.to(K.dtype).transpose(-1, -2)  # (..., k, m)
    M = K.unsqueeze(-3) * Dt.unsqueeze(-1) * Dt.unsqueeze(-2)
    M.diagonal(dim1=-2, dim2=-1).add_(1 - Dt)
    return M


def _factor_solve(C: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # M^-1 r from M's lower Cholesky factor C: two triangular solves (see support_solve on cholesky_solve)
    return torch.linalg.solve_triangular(C.mT, torch.linalg.solve_triangular(C, r, upper=False), upper=True)


class _CholeskySolve(torch.autograd.Function):
    """``(v, C, info) = _CholeskySolve.apply(M, r)``: ``v = M^-1 r`` for a batch of symmetric positive definite systems
    ``M`` (``(..., s, s)``, ``r`` ``(..., s, 1)``) by ``torch.linalg.cholesky_ex``, with its factor ``C`` and ``info``
    (not differentiable).

    The backward pass reuses the factor: ``y = M^-1 g``, the gradient ``y`` for ``r`` and ``-(y v^T + v y^T) / 2`` for
    ``M`` (the symmetric part, as autograd's own for a Cholesky factorisation), and zero for a system whose
    factorisation failed (``info != 0``). Through ``cholesky_ex`` and the triangular solves autograd turned the zero
    or NaN pivots of a failed factor into NaN gradients, even for the columns that a caller replaces by another value
    (``torch.where`` differentiates the branch it does not take): a singular support block, with more atoms on the
    support than the signal has dimensions (a VARS-D layer's ``active_set`` on fewer tokens than features), gave a
    NaN input gradient. It is also two triangular solves a system where autograd's backward through the factorisation
    took cubic work."""

    @staticmethod
    def forward(ctx, M, r):
        C, info = torch.linalg.cholesky_ex(M)
        v = _factor_solve(C, r)
        ctx.mark_non_differentiable(C, info)
        ctx.save_for_backward(C, info, v)
        return v, C, info

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _gC, _ginfo):
        C, info, v = ctx.saved_tensors
        good = (info == 0)[..., None, None]
        eye = torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
        C = torch.where(good, C, eye)
        y = _factor_solve(C, g)
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        y, v = torch.where(good, y, zero), torch.where(good, v, zero)
        yv = y @ v.mT
        return -0.5 * (yv + yv.mT), y


def support_solve(K: torch.Tensor, mask: torch.Tensor, R: torch.Tensor, *, compact: bool = True, shift=None):
    """Solve ``(D_j K D_j + I - D_j) v_j = r_j`` for every column ``j`` (the system of :func:`support_system`) by a
    batched Cholesky factorisation of each column's support block ``K_SS`` alone; off the support ``v_j = r_j``.
    ``shift`` (a float or a tensor broadcastable to the columns, ``(..., k)``) solves ``K_SS + shift_j I`` instead.

    ``K``: ``(..., m, m)``; ``mask``: ``(..., m, k)``, 1 where active and 0 elsewhere; ``R``: ``(..., m, k)``.
    With ``compact`` the systems are ``s x s``, ``s`` the largest support of any column (one host read), instead of
    ``m x m``: a column's support indices come first and the remaining slots of the block are identity rows. The
    triangular solves are two ``solve_triangular`` calls (``cholesky_solve`` took 5x as long on batches of
    128 x 128 systems here, benchmarks/RESULTS.md).

    Returns ``(V, ok)``: ``V`` ``(..., m, k)``; ``ok`` ``(..., k)``, false where the factorisation failed or the
    smallest pivot of its support is below ``m eps`` times the largest (a singular ``K_SS`` to working precision,
    for which ``V`` is not to be trusted)."""
    m = K.shape[-1]
    batch = torch.broadcast_shapes(K.shape[:-2], mask.shape[:-2], R.shape[:-2])
    k = mask.shape[-1]
    Dt = mask.to(K.dtype).transpose(-1, -2).expand(*batch, k, m)  # (..., k, m)
    Rt = R.transpose(-1, -2).expand(*batch, k, m)
    inactive = Dt == 0  # a NaN entry of the mask counts as active (its column then fails, below)
    s = (m - int(inactive.sum(-1).amin()) if Dt.numel() else 0) if compact else m
    if s == 0:  # no column has a support: the system is the identity
        return Rt.transpose(-1, -2).clone(), torch.ones(Dt.shape[:-1], dtype=torch.bool, device=K.device)
    # each column's support first (a stable sort of the 0 / 1 mask of inactive entries), cut to s slots
    idx = torch.argsort(inactive.to(torch.uint8), dim=-1, stable=True)[..., :s]  # (..., k, s)
    act = torch.gather(Dt, -1, idx)
    # K[b, idx_i, idx_j] by advanced indexing (index tensors broadcast, none materialised at full size)
    nb = len(batch)
    Kx = K.reshape((1,) * (nb - (K.dim() - 2)) + tuple(K.shape))
    index = []
    for d, size in enumerate(Kx.shape[:-2]):
        shape = [1] * (nb + 3)
        shape[d] = size
        index.append(torch.arange(size, device=K.device).view(shape) if size > 1
                     else torch.zeros((), dtype=torch.long, device=K.device))
    M = Kx[(*index, idx.unsqueeze(-1), idx.unsqueeze(-2))]  # (..., k, s, s)
    M = M * act.unsqueeze(-1) * act.unsqueeze(-2)
    diag = 1 - act
    if shift is not None:
        diag = diag + act * torch.as_tensor(shift, dtype=M.dtype, device=M.device).unsqueeze(-1)
    if torch.compiler.is_compiling():
        # out of place: under torch.compile (AOTAutograd, torch 2.14.1) the in-place update of M's diagonal, in the
        # graph that follows the host read of s above, gave K's diagonal a wrong gradient (implicit_euler's unrolled
        # gradient 0.28 off on a 12-atom problem); eagerly in place (M is k s x s systems; the same values)
        M = M + torch.diag_embed(diag)
    else:
        M.diagonal(dim1=-2, dim2=-1).add_(diag)
    rc = torch.gather(Rt, -1, idx).unsqueeze(-1)
    v, C, info = _CholeskySolve.apply(M, rc)
    V = Rt.scatter(-1, idx, v.squeeze(-1))
    piv = C.diagonal(dim1=-2, dim2=-1).pow(2)
    # the pivots of the support alone: the identity slots' pivots (1) say nothing of K_SS, and beside a K of another
    # scale (entries of 1e6, or 1e-6, in float32) they made every support look singular
    on = act != 0  # (a NaN entry counts as on: its column fails)
    top = torch.where(on, piv, torch.zeros((), dtype=piv.dtype, device=piv.device)).amax(-1)
    low = torch.where(on, piv, torch.full((), math.inf, dtype=piv.dtype, device=piv.device)).amin(-1)
    ok = (info == 0) & (low > m * torch.finfo(K.dtype).eps * top)
    return V.transpose(-1, -2), ok
