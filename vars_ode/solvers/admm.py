"""ADMM for the LASSO in Gram form: the equilibrium of a layer in tens of iterations where FISTA takes hundreds.

The splitting ``u = z`` of ``min 0.5 u^T K u - u^T b + w ||z||_1`` (Boyd et al. 2011, Sec. 6.4), in scaled form
with over-relaxation ``alpha``::

    u  <- (K + rho I)^{-1} (b + rho (z - y))
    z  <- S_{w/rho}(alpha u + (1 - alpha) z + y)
    y  <- y + alpha u + (1 - alpha) z - z_new

The problems that share a matrix ``K`` (the columns of a Gram-form code: the channels of one head and image in a
layer) share its factorisation, formed once per ``rho``: an explicit inverse of each ``m x m`` matrix. The ``u`` step
has two forms, equal in exact arithmetic:

* ``form="direct"`` (the default) is the step above, ``rho u = rho (K + rho I)^{-1} b + rho (K + rho I)^{-1} rho (z -
  y)`` with the first term formed once per ``rho``: one batched product an iteration. Its fixed point carries the
  inverse's rounding, amplified by up to ``L / rho``: in float32 a DeiT-Ti-width dense VARS-SD layer's problems
  stalled at 1.4e-5 in this form alone. So it runs until the worst residual of a check is within ``SWITCH`` (10)
  times ``tol``, or stops halving between two checks, and goes on in the other form;
* ``form="correction"``: ``u = z - (K + rho I)^{-1} (K z - b + rho y)``, two products an iteration, and its fixed
  point is the LASSO's with the exact ``K`` (the inverse's rounding moves the path, not the point).

A check computes ``K z - b`` (the gradient at ``z``, so the KKT residual of the returned sparse code) and takes that
iteration in the correction form at no further cost. On a CPU the direct form made the layer's equilibrium 6-14%
faster at the same iteration counts (benchmarks/RESULTS.md, fourteenth session).

Where FISTA's rate depends on the condition number of ``K / L`` (the smallest eigenvalues of a layer's
``Phi^T Phi`` are about ``2e-4 L``), ADMM's depends on how ``rho`` sits between the extremes of the spectrum.
``rho`` defaults to ``0.01 L`` (``L`` the largest eigenvalue), near ``sqrt(lambda_min L)`` for the layers of
the library; with ``tol > 0`` it is adapted by residual balancing (Boyd et al., Sec. 3.4.1, with the residuals
normalised as in OSQP, Stellato et al. 2020): every ``adapt`` iterations, per matrix, ``rho`` is multiplied by
``sqrt(primal / dual)`` (clipped to [0.1, 10], applied when it is above 2 or below 1/2), where the primal
residual is ``||u - z||`` relative to ``max(||u||, ||z||)`` and the dual one ``||z - z_prev||`` relative to
``||y||``, and the inverse is formed again. The unrolled gradient (``grad="unroll"``) treats each ``rho`` as a
constant, as the ODE solvers treat their step sizes: converged to 1e-9, it is then within 5e-7 of the implicit
gradient, where differentiated through the balancing it was 3e-6 to 1.3e-5 from it (and NaN where a residual was
zero). Started from ``rho = L`` (100 times the default) the layer problems
of the sweeps in ``benchmarks/RESULTS.md`` took 1.7-2.5x the default's iterations. Measured
there: a DeiT-Ti-width VARS-D layer's problems to a KKT residual of 1e-4, 36-44 iterations against FISTA's 384;
the study's smaller model (50 tokens for 64 features, a singular ``K``) 100-270 against FISTA's 250-930.

Precision: an iteration multiplies rounding errors of ``K z - b`` by up to ``L / rho`` (100 by default), so in
float32 the residual stalls at a level that grows with ``L / rho`` (measured: about 3e-6 on the Quick start
problem, where FISTA reaches 1e-6); for tighter tolerances use float64 or FISTA. A fixed
budget (``tol = 0``: a layer's ``steps``) runs exactly ``max_iter`` iterations with the initial ``rho``, in the
chosen form throughout, and never reads the device.

Needs the matrix ``K`` (:attr:`vars_ode.lasso.Operator.has_gram`) of a single block.
"""
from __future__ import annotations

import math
import numbers

import torch

from ..ops import by_rows, symmetric_matmul
from .iterative import _Freezer, _record, _reject, check_due

#: options: rho (a multiple of L), relax (alpha), adapt (iterations between rho updates; 0: fixed), check_every, form
OPTIONS = ("rho", "relax", "adapt", "check_every", "form")
RHO_RANGE = (1e-4, 10.0)  #: bounds of the adapted rho, as multiples of L
FIRST_CHECK = 8  #: the first check of the residual with check_every="auto"
#: form="direct" goes on in the correction form once the worst residual at a check is below SWITCH * tol (or is
#: above half that of the check before)
SWITCH = 10.0


def _check_options(rho, relax, adapt, form):
    if form not in ("correction", "direct"):
        raise ValueError(f"form must be 'correction' or 'direct', got {form!r}")
    if not isinstance(rho, numbers.Real) or isinstance(rho, bool) or not RHO_RANGE[0] <= rho <= RHO_RANGE[1]:
        raise ValueError(f"rho must be a number in [{RHO_RANGE[0]:g}, {RHO_RANGE[1]:g}] (a multiple of L), got {rho!r}")
    if not isinstance(relax, numbers.Real) or isinstance(relax, bool) or not 0 < relax < 2:
        raise ValueError(f"relax must be a number in (0, 2), got {relax!r}")
    if not isinstance(adapt, numbers.Integral) or isinstance(adapt, bool) or adapt < 0:
        raise ValueError(f"adapt must be a non-negative integer (0: rho stays fixed), got {adapt!r}")


def _inverse(K, r, eye):
    # (K + r I)^{-1} = C^{-T} C^{-1} from its Cholesky factor C (symmetric positive definite for r > 0; a matrix
    # with non-finite entries gives non-finite columns, which the stopping rule marks, the others go on): on the
    # project's CPU 2x faster than torch.cholesky_inverse for batches of 128 x 128 (benchmarks/RESULTS.md, eighth
    # session). Not LU: see vars_ode.gradients._support_solve
    C = torch.linalg.cholesky_ex(K + r * eye)[0]
    Ci = torch.linalg.solve_triangular(C, eye.expand_as(C), upper=False)
    return Ci.mT @ Ci


def _add_product(out, M, X, C=None):
    # out = C + M @ X (C None: out += M @ X in place): one batched GEMM that adds where the batch shapes allow (no
    # pass of its own); by rows where vars_ode.ops.by_rows says so (the matrices of the iteration are symmetric:
    # K, K / rho, rho (K + rho I)^{-1})
    base = out if C is None else C
    if M.shape[:-2] == X.shape[:-2] == base.shape[:-2] == out.shape[:-2] and all(
            t.is_contiguous() for t in (out, M, X, base)):
        n, k = M.shape[-1], X.shape[-1]
        Mf = M.reshape(-1, n, n)
        if by_rows(M, X):  # with one column, (n, 1) and (1, n) are views of the same memory
            Xf, of, cf = X.view(-1, 1, n), out.view(-1, 1, n), base.view(-1, 1, n)
            if C is None:
                of.baddbmm_(Xf, Mf)
            else:
                torch.baddbmm(cf, Xf, Mf, out=of)
            return out
        Xf, of = X.view(-1, n, k), out.view(-1, n, k)
        if C is None:
            of.baddbmm_(Mf, Xf)
        else:
            torch.baddbmm(C.view(-1, n, k), Mf, Xf, out=of)
    elif C is None:
        out.add_(symmetric_matmul(M, X))
    else:
        symmetric_matmul(M, X, out=out).add_(C)
    return out


def _reinvert(K, r, invr, changed, eye, inplace):
    # rho (K + rho I)^{-1} formed again for the matrices where ``changed`` (shape K's batch + (1, 1)) holds; the
    # others keep theirs. A new tensor when autograd records (the old one is saved by earlier iterations)
    m = K.shape[-1]
    sel = changed.reshape(-1)
    Kf, rf = K.reshape(-1, m, m), r.reshape(-1, 1, 1)
    out = invr if inplace else invr.clone()
    out.view(-1, m, m)[sel] = rf[sel] * _inverse(Kf[sel], rf[sel], eye)
    return out


def _norm(t, batch):
    # the Euclidean norm of t over the problems of each matrix K (batch: K's batch shape + (1, 1)), one pass
    n = torch.linalg.vector_norm(t, dim=(-2, -1), keepdim=True)
    return n if n.shape == batch else n.square().sum_to_size(batch).sqrt()


def _per_matrix(t, batch):
    # the largest entry of a per-problem tensor (broadcastable to a code block) over the problems of each matrix K
    t = t.expand(torch.broadcast_shapes(t.shape, batch))
    if t.dim() > len(batch):
        t = t.amax(tuple(range(t.dim() - len(batch))))
    dims = tuple(i for i, s in enumerate(batch) if s == 1 and t.shape[i] != 1)
    return t.amax(dims, keepdim=True) if dims else t


def _next_check(it, fr, tol, last):
    # the iteration of the next check, from the largest residual of the problems still running and the rate at
    # which it fell since the last check (ADMM converges linearly): the predicted iteration at which it reaches
    # tol, at least 2 and at most 16 iterations ahead (4 while no rate is known)
    r = fr.residual.detach()
    worst = float(torch.where(fr.done, torch.zeros_like(r), r).amax())
    gap = 4
    if last is not None and 0 < worst < last[1]:
        rate = math.log(worst / last[1]) / (it - last[0])       # log of the factor per iteration, < 0
        gap = min(max(math.ceil(math.log(tol / worst) / rate), 2), 16)
    return it + gap, (it, worst)


def admm(op, B, w, L, init, *, tol, max_iter, rho=0.01, relax=1.8, adapt=8, check_every="auto", trace=None,
         record=None, form="direct", **unused):
    """ADMM on the LASSO of ``op`` (see the module docstring). Returns ``(code, iterations)``.

    Options: ``rho`` (the initial penalty as a multiple of ``L``, in [1e-4, 10]), ``relax`` (over-relaxation
    ``alpha`` in (0, 2); 1 is plain ADMM), ``adapt`` (iterations between updates of ``rho`` when ``tol > 0``;
    0 keeps it fixed), ``check_every`` (``"auto"``, the default: the first check of the residual at iteration 8, each
    next one where the rate since the last predicts that the slowest running problem reaches ``tol``, 2 to 16
    iterations ahead, or with a ``trace`` every iteration; or a positive integer: every so many iterations, and at
    ``max_iter``). A check costs about half an iteration and one host read. ``form``: ``"direct"`` (one product an
    iteration, then the correction form near ``tol``) or ``"correction"`` (two; see the module docstring). ``record``
    receives ``z`` after every iteration."""
    _reject(unused, "admm", OPTIONS)
    _check_options(rho, relax, adapt, form)
    direct = form == "direct"
    if op.num_blocks != 1:
        raise ValueError(f"solver 'admm' needs an operator of one block, got {op.num_blocks}")
    K, b = op.gram(), B[0]
    m = K.shape[-1]
    eye = torch.eye(m, dtype=K.dtype, device=K.device)
    batch = K.shape[:-2] + (1, 1)  # one rho per matrix K, shared by the problems (columns) that use it
    scale = _per_matrix(torch.as_tensor(op.expand(0, L), dtype=b.dtype, device=b.device).detach(), batch)
    # a zero dictionary has L = 0, which the callers raise to the dtype's smallest normal number: there 1 / rho
    # overflows, (K + rho I)^{-1} is infinite, and so is an unrolled gradient. Any rho solves such a problem (K below
    # rho's rounding): it takes the scale of a unit L. Every L above tiny / eps (1e-292 in float64, 1e-31 in
    # float32, where 1 / rho stays finite at RHO_RANGE[0]) is left as it is
    floor = torch.finfo(b.dtype).tiny / torch.finfo(b.dtype).eps
    scale = torch.where(scale > floor, scale, torch.ones_like(scale))
    r = rho * scale
    wk = op.expand(0, w)
    # the iteration runs on Z = rho z and the unscaled dual Lam = rho y, so that the threshold is w itself (a
    # scalar clamp for a float weight) and a change of rho leaves Lam as it is; K / rho and rho (K + rho I)^{-1}
    # are formed once per rho. A = Z + Lam (the point before the threshold: Z = A - clamp(A), Lam = clamp(A))
    # is kept as a variable of its own, one pass fewer per iteration
    Kr, invr = K / r, r * _inverse(K, r, eye)
    # rho (K + rho I)^{-1} b, the constant part of the direct form's product
    c = symmetric_matmul(invr, b) if direct else None
    Z = torch.zeros_like(b) if init is None else r * init[0]
    Lam = torch.zeros_like(b)
    A = Z.clone()
    # without a graph to record (grad="implicit", inference) the iteration writes into buffers of its own: the
    # element-wise passes of an iteration cost more than its products when every pass allocates (measured in
    # benchmarks/RESULTS.md); with one, new tensors
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (K, b, Z, torch.as_tensor(wk))))
    if inplace:
        E, D = torch.empty_like(b), torch.empty_like(b)
    # "auto" without a trace: the schedule is kept here (_next_check) and the freezer checks whenever asked; with
    # a trace, which asks for the whole history, the freezer checks every iteration
    predict = check_every == "auto" and trace is None
    fr = _Freezer(op, (Z,), tol, 1 if predict else check_every, trace, max_iter, B=B)
    lo, hi = RHO_RANGE[0] * scale, RHO_RANGE[1] * scale
    tiny = torch.finfo(b.dtype).tiny
    next_check, last, prev_worst = FIRST_CHECK, None, None
    it = 0
    for it in range(max_iter + 1):
        if tol <= 0 and it == max_iter:
            break
        balance = tol > 0 and adapt and (it + 1) % adapt == 0
        corrected = not direct
        if tol > 0 and (it >= next_check or it == max_iter if predict else check_due(it, fr.check_every, max_iter)):
            # at a check, K z - b as the KKT residual of the returned code is computed (vars_ode.lasso), so that a
            # problem stopped at tol has that residual to the last bit
            z = Z / r
            g = symmetric_matmul(K, z) - b
            if fr.check(it, (z,), (g,), w) or it == max_iter:
                break
            if predict:
                next_check, last = _next_check(it, fr, tol, last)
            if direct:  # on in the correction form near tol, or once the residual stops halving between checks
                worst = last[1] if predict else float(torch.where(fr.done, 0.0, fr.residual.detach()).amax())
                direct = worst > SWITCH * tol and not (prev_worst is not None and worst > 0.5 * prev_worst)
                prev_worst = worst
            E = torch.add(g, Lam, out=E if inplace else None)
            corrected = True
        elif direct:
            E = torch.sub(Z, Lam, out=E if inplace else None)  # rho (z - y)
        elif inplace:
            torch.sub(Lam, b, out=E)
            _add_product(E, Kr, Z)  # K z - b + y (times rho)
        else:
            E = symmetric_matmul(Kr, Z) - b + Lam
        # u = z - d, and a = alpha u + (1 - alpha) z + y = z + y - alpha d; z_new = a - clamp(a), y_new = clamp(a);
        # times rho: D = rho d, A = rho a, bounds +-w
        Z_prev = Z.clone() if inplace and balance else Z
        if inplace:
            if corrected:
                symmetric_matmul(invr, E, out=D)
            else:  # rho u = c + rho (K + rho I)^{-1} rho (z - y), D = Z - rho u
                torch.sub(Z, _add_product(D, invr, E, c), out=D)
            A.sub_(D, alpha=relax)
            torch.clamp(A, -wk, wk, out=Lam)
            torch.sub(A, Lam, out=Z)
        else:
            D = symmetric_matmul(invr, E) if corrected else Z - (c + symmetric_matmul(invr, E))
            A = A - relax * D
            Lam = torch.clamp(A, -wk, wk)
            Z = A - Lam
        if record is not None:
            _record(record, (Z / r,))
        if balance:
            # residual balancing, per matrix: the relative primal residual ||u - z|| / max(||u||, ||z||) against
            # the relative dual one ||z - z_prev|| / ||y|| (both the same in the scaled variables)
            # rho is a choice of the algorithm, as an ODE's step size is: without a graph (the fixed point does not
            # depend on it, and the square root's derivative at a zero residual, such as every code at zero, is
            # infinite: unrolled gradients of such a problem were NaN)
            with torch.no_grad():
                U = Z_prev - D
                primal = _norm(U - Z, batch) / torch.maximum(_norm(U, batch), _norm(Z, batch)).clamp_min(tiny)
                dual = _norm(Z - Z_prev, batch) / _norm(Lam, batch).clamp_min(tiny)
                factor = (primal / dual.clamp_min(tiny)).sqrt().clamp(0.1, 10.0)
                factor = torch.where((factor > 2) | (factor < 0.5), factor, torch.ones_like(factor))
                new = torch.minimum(torch.maximum(r * factor, lo), hi)
            changed = new != r
            n_changed = int(changed.sum())
            if n_changed:
                Z = Z.mul_(new / r) if inplace else Z * (new / r)
                A = torch.add(Z, Lam, out=A if inplace else None)
                r = new
                Kr = K / r
                if n_changed == changed.numel():
                    invr = r * _inverse(K, r, eye)
                else:  # only the matrices whose rho moved (with one K per problem, a few of hundreds late on)
                    invr = _reinvert(K, r, invr, changed, eye, inplace)
                if direct:
                    c = symmetric_matmul(invr, b)
    code, iters = fr.result((Z / r,), it)
    return code, iters
