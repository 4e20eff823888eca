"""Proximal-gradient solvers: ISTA (Eq. 12), FISTA and FISTA with Newton steps on the active set.

Each is written once against :class:`vars_ode.lasso.Operator`: it applies ``K = P^T P`` to codes (tuples of
blocks) and sees ``b = P^T x``, never ``P`` or the signals, so the signal dimension (the token count of a
layer) never enters the loop. The Gram form (``K`` a matrix, one problem per column) and a layer's
convolutional templates run through the same lines. Per-problem tensors (``w``, ``L``, iteration counts)
have the problems' shape (:mod:`vars_ode.lasso`). Problems whose KKT residual reaches
``tol`` are frozen; the loop ends when all are, or after ``max_iter`` iterations. With ``tol = 0``
the loop runs exactly ``max_iter`` iterations and never synchronises with the host.

With ``tol > 0`` each check of the residual is one host read (a device synchronisation on a GPU). By
default (``check_every="auto"``) the residual is checked at every iteration below 32, then at gaps of
at most a sixteenth of the iteration count (2 from 32, 4 from 64, 8 from 128, ...), and at
``max_iter``: about ``32 + 16 log2(n / 32)`` reads for ``n`` iterations instead of ``n``. A problem's
reported count is the first checked iteration at which its tolerance held (with a residual that keeps
decreasing, at most 1/16 above the first iteration at which it held). With a
``trace`` the default is every iteration (the whole residual history); ``check_every=k`` checks every
``k`` iterations (and at ``max_iter``).

Without a graph (an equilibrium solved for its implicit gradient, ``vo.solve`` under ``torch.no_grad``) and on large
CPU codes, ISTA and FISTA write their iterates and temporaries into tensors of the call's own,
rewritten every iteration (:class:`_Buffers`): the same operations in the same order, so the same values, without
the page faults of fresh multi-megabyte tensors (the convolutional VARS-SD layer's equilibrium 22% faster:
benchmarks/RESULTS.md, twenty-fifth session).
"""
from __future__ import annotations

import functools
import numbers

import torch

from ..lasso import Operator, RankOneMetric, residual_from_grad, tmap
from ..ops import _soft, support_solve
from .native import _inplace


#: below this iteration the "auto" schedule checks every iteration; from it, at gaps of at most it / 16
AUTO_EXACT = 32


#: checks in a row with a residual within the bound on its rounding above tol before the exact rounding is asked for
#: (a converging problem passes such a band in a few checks; FISTA's residual is not monotone, so one check that did
#: not fall is no sign: that rule stopped 42-68 of 300 problems short of tol where 10-20 needed it)
FLOOR_PATIENCE = 8


def check_due(it: int, check_every, max_iter: int) -> bool:
    """Whether iteration ``it`` checks the residual: ``check_every`` an integer, or ``"auto"`` (every
    iteration below :data:`AUTO_EXACT`, then at multiples of the largest power of two at most ``it / 16``);
    ``max_iter`` is always checked."""
    if it == max_iter:
        return True
    if check_every == "auto":
        return it < AUTO_EXACT or it % (1 << (it.bit_length() - 5)) == 0
    return it % check_every == 0


def _check_every(value):
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(f"check_every must be 'auto' or a positive integer, got {value!r}")


class _Freezer:
    """Per-problem stopping without masking every iteration: at each check, problems whose
    residual is at or below ``tol`` keep the iterate of that moment; the batch iterates on (a
    converged problem only moves within its tolerance) until all have stopped or the budget ends.

    With the problems' ``B`` and an operator that offers :meth:`~vars_ode.lasso.Operator.residual_rounding`, a problem
    also stops where its residual is above ``tol`` by no more than the rounding of its evaluation after
    ``FLOOR_PATIENCE`` checks in a row near it: at the working precision's floor, where it only moves with the
    rounding (float32 at tol 1e-5 on ill-conditioned dictionaries: one of 300 problems held a FISTA solve for 4,864
    iterations where the others stopped by 112, benchmarks/RESULTS.md, thirtieth session). The exact rounding costs a
    product with ``|K|`` and a host read, taken only at checks where the bound without it leaves such a problem."""

    def __init__(self, op, like, tol, check_every, trace, max_iter, buffers=None, B=None):
        check_every = _check_every(check_every)
        self.buffers = buffers if buffers is not None and buffers.on else None  # a solver's _Buffers: the check's work
        if check_every == "auto" and trace is not None:
            check_every = 1  # a trace asks for the whole history
        self.op, self.tol, self.check_every, self.trace, self.max_iter = op, tol, check_every, trace, max_iter
        self.done = op.problems_like(like, False, torch.bool)
        self.iters = op.problems_like(like, 0, torch.long)
        self.kept = like
        self.B, self.streak = B, None  # the problems' B (the rounding floor); per problem, checks in a row near it

    def check(self, it, u, grad, w) -> bool:
        """True when every problem has stopped. ``grad``: the code tuple ``K u - b``, or a function giving it
        (evaluated only when a check is due)."""
        if self.tol <= 0 or not check_due(it, self.check_every, self.max_iter):
            return False
        grad = grad() if callable(grad) else grad
        work = None if self.buffers is None else tuple(zip(*(self.buffers.get(n) for n in ("r1", "r2", "r3"))))
        r = self.residual = residual_from_grad(self.op, grad, u, w, buffers=work)
        new = ~self.done & ((r <= self.tol) | ~torch.isfinite(r))
        done = self.done | new
        near = self._near_floor(u, r, new)
        # one host read for both answers; the iterate is copied into the kept one only when a problem stopped
        # (a selection over every element of the code, the cost of an iteration's element-wise pass or more)
        flags = new.any().to(torch.uint8) * 2 + done.all().to(torch.uint8)
        state = int(flags if near is None else flags + near.any().to(torch.uint8) * 4)
        if state & 4:  # some problem may sit at the floor: its exact rounding decides (a second read, rare)
            at_floor = near & (r <= self.tol + self.op.residual_rounding(u, self.B))
            self.streak = torch.where(near & ~at_floor, 0, self.streak)  # asked again FLOOR_PATIENCE checks later
            new = new | at_floor
            done = self.done | new
            state = int(new.any().to(torch.uint8) * 2 + done.all().to(torch.uint8))
        if state >= 2:
            self.kept = self.op.where(new, u, self.kept)
            self.iters = torch.where(new, torch.full_like(self.iters, it), self.iters)
        self.done = done
        if self.trace is not None:
            self.trace.append((it, float(torch.where(self.done, torch.zeros_like(r), r).amax())))
        return bool(state & 1)

    def _near_floor(self, u, r, new):
        # problems above tol whose residual may be rounding alone (within the bound without a product) at
        # FLOOR_PATIENCE checks in a row
        if self.B is None:
            return None
        bound = self.op.residual_rounding(u, self.B, bound=True)
        if bound is None:
            return None
        band = ~self.done & ~new & (r <= self.tol + bound)
        self.streak = torch.where(band, self.streak + 1, 0) if self.streak is not None else band.long()
        return self.streak >= FLOOR_PATIENCE

    def result(self, u, it):
        if self.tol <= 0:
            return u, torch.full_like(self.iters, it)
        iters = torch.where(self.done, self.iters, torch.full_like(self.iters, it))
        return self.op.where(self.done, self.kept, u), iters


def _steps(op, w, L):
    """Per block, the proximal step ``v -> S_{w/L}(v - g / L)`` as a function of ``(v, g, out=None)``.

    With a float weight ``w`` it is ``-(1/L) S_w(g - L v)`` (``S`` odd and ``S_{ws}(x) = s S_w(x / s)``): one fused
    multiply-add, one ``softshrink`` with a scalar threshold and one product, where the threshold ``w / L`` per
    problem would need a clamp against broadcast bounds; forward + backward 2.9x faster on the convolutional
    atoms' code (benchmarks/RESULTS.md). The two forms differ by rounding. A per-problem weight takes the latter.
    ``out`` (not for autograd): the step is written into it, and ``g`` (a buffer of the caller's) is overwritten on
    the way; the same operations either way, so the same values.
    """
    n = op.num_blocks
    # a tuple: a bound per block (a metric's diagonal, _metric_steps)
    Ls = tuple(op.expand(i, L[i] if isinstance(L, tuple) else L) for i in range(n))
    if isinstance(w, numbers.Real) and not isinstance(w, bool) and w >= 0:
        wf = float(w)

        def step(v, g, out=None, *, Li, ns):
            x = torch.addcmul(g, Li, v, value=-1, out=None if out is None else g)
            return torch.mul(_soft(x, wf, out=out), ns, out=out)
        return tuple(functools.partial(step, Li=Li, ns=-1.0 / Li) for Li in Ls)

    def per_problem(v, g, out=None, *, si, t):
        x = v - si * g if out is None else torch.sub(v, torch.mul(si, g, out=g), out=g)
        return _soft(x, t, out=out)
    inv = tuple(1.0 / Li for Li in Ls)
    return tuple(functools.partial(per_problem, si=si, t=op.expand(i, w) * si) for i, si in enumerate(inv))


#: Newton steps a FISTA iteration takes on the multiplier of the rank-one metric's proximal step, each from the
#: previous iteration's value (the function is piecewise linear: one step lands on its root once the support is
#: settled)
METRIC_NEWTON = 2
#: the largest ratio ``(d + rho) / d`` (``lambda_1 / lambda_2``) a metric's step is taken with: where ``rho`` is larger,
#: ``d`` is raised to ``(d + rho) / METRIC_CAP`` and ``rho`` lowered by as much, which keeps ``H >= K`` (the same top
#: eigenvalue, a looser bound off ``v``). The Newton steps' function has slopes from 1 to that ratio, and near rank one
#: (ratios of 1e3 to 1e14: a single token, one-dimensional signals, atoms sharing one direction) two steps left the
#: multiplier inexact and ISTA, FISTA and active_set diverged (residuals up to 1e86); with caps of 64 and more FISTA
#: stalled on some such dictionaries, with 32 on none of 240 (benchmarks/RESULTS.md, thirty-second session)
METRIC_CAP = 32.0


def _metric_steps(op, w, m: RankOneMetric, newton: int | None = None):
    """:func:`_steps` in the metric ``H = diag(scales) + rho v v^T``: ``v -> prox^H(v - H^{-1} g)`` per block.

    Off the rank-one block a step is the scalar one with that block's scale. On it ``H^{-1}`` is Sherman-Morrison's,
    and the proximal step ``argmin_p w ||p||_1 + 0.5 (p - z)^T H (p - z)`` is ``S_{w/d}(z - a u / d)`` (``u =
    sqrt(rho) v``, ``d`` the block's scale) at the root ``a`` of ``a + u^T (z - S_{w/d}(z - a u / d))``, increasing
    and piecewise linear in ``a`` (Becker and Fadili, 2012: the proximal step in a diagonal-plus-rank-one metric),
    found by :data:`METRIC_NEWTON` Newton steps from the previous iteration's root (per problem). With ``s = z - a u /
    d`` and ``c`` its clamp to ``[-w/d, w/d]``: ``z - p = c + a u / d``, so the function is ``a (1 + rho / d) +
    sqrt(rho) v^T c`` and its slope ``1 + (rho / d)`` times the sum of ``v_j^2`` where ``|s_j| > w/d``. The block's atoms
    run along dimension -2 (``v`` is ``(..., m, 1)``), so the sums over them are products with ``v^T``. A ratio ``(d +
    rho) / d`` above :data:`METRIC_CAP` is lowered to it first."""
    newton = METRIC_NEWTON if newton is None else int(newton)
    i = m.block
    steps = list(_steps(op, w, m.scales))
    d_p, rho_p = m.scales[i], m.rho
    top = d_p + rho_p
    capped = rho_p > (METRIC_CAP - 1) * d_p  # d < top / METRIC_CAP (elsewhere d and rho are kept to the bit)
    d_p = torch.where(capped, top / METRIC_CAP, d_p)
    rho_p = torch.where(capped, top - d_p, rho_p)
    e = functools.partial(op.expand, i)
    v = m.v
    vt, vsq_t = v.transpose(-1, -2), (v * v).transpose(-1, -2)
    inv_d = e(1.0 / d_p)
    q, sq = e(rho_p / d_p), e(rho_p.sqrt())
    ud = v * (sq * inv_d)  # u / d, the block's shape
    corr = e(rho_p / (d_p * (d_p + rho_p)))  # H^{-1} g = g / d - corr v (v^T g)
    thr = e(w) * inv_d
    root = {}

    def spike(y, g, out=None):
        z = torch.addcmul(y, g, inv_d, value=-1).add_(v @ (corr * (vt @ g)))
        a = root.get("a")
        if a is None:
            a = torch.zeros_like(vt @ z)
        for _ in range(newton):
            s = torch.addcmul(z, a, ud, value=-1)
            c = torch.clamp(s, -thr, thr)
            f = a * (1 + q) + sq * (vt @ c)
            inactive = vsq_t @ (c == s).to(c.dtype)
            a = a - f / (1 + q * (1 - inactive))
        root["a"] = a
        s = torch.addcmul(z, a, ud, value=-1)
        return torch.sub(s, torch.clamp(s, -thr, thr), out=out)

    steps[i] = spike
    return tuple(steps)


def resolve_metric(op, tol, metric) -> RankOneMetric | None:
    """The metric that ``metric`` names for ISTA's and FISTA's steps (``"auto"``: the operator's own to a tolerance,
    none with a fixed budget; ``"none"``; or a :class:`vars_ode.lasso.RankOneMetric`), or ``None``: the scalar bound
    ``L``."""
    if isinstance(metric, RankOneMetric):
        return metric
    if isinstance(metric, str) and metric == "auto":
        return op.metric() if tol > 0 else None
    if isinstance(metric, str) and metric == "none":
        return None
    raise ValueError(f"metric must be 'auto', 'none' or a vars_ode.lasso.RankOneMetric, got {metric!r}")


def _prox_steps(op, w, L, tol, metric):
    """ISTA's and FISTA's steps: in the metric :func:`resolve_metric` gives, else with the scalar bound ``L``."""
    metric = resolve_metric(op, tol, metric)
    return _steps(op, w, L) if metric is None else _metric_steps(op, w, metric)


class _Buffers:
    """The iterates of one :func:`ista` or :func:`fista` call in tensors of its own, written again at every iteration
    instead of allocated (``on``: large CPU codes, no graph, nothing recorded;
    :func:`vars_ode.solvers.native._inplace`). A fresh multi-megabyte tensor pays a page fault a page on its first
    write: on the convolutional templates' 6 MB codes, the allocating loop's element-wise steps took several times an
    in-place pass. Two code buffers alternate for ``u`` and the next ``u``; the others are rewritten every
    iteration; the residual check works in three of them (:func:`vars_ode.ops.kkt_violation`'s ``buffers``: 8 -> 2 ms
    a check on that code). The buffers are the call's, not a pool's: a code it returns is never written again.
    ``None`` everywhere when off."""

    def __init__(self, on: bool, like: tuple):
        self.on, self.like, self.flip, self.made = on, like, 0, {}

    def get(self, name: str) -> tuple:
        if not self.on:
            return (None,) * len(self.like)
        if name not in self.made:
            self.made[name] = tuple(torch.empty_like(t) for t in self.like)
        return self.made[name]

    def next_code(self) -> tuple:
        self.flip ^= 1
        return self.get(f"u{self.flip}")

    def gradient(self, Kx: tuple, B: tuple) -> tuple:
        """``K x - b`` into the gradient's buffer ``g`` (rewritten by the next call)."""
        return tuple(torch.sub(k, b, out=o) for k, b, o in zip(Kx, B, self.get("g")))


def _record(record, code):
    if record is not None:
        record.append(tuple(c.detach() for c in code))


def ista(op, B, w, L, init, *, tol, max_iter, check_every="auto", metric="auto", trace=None, record=None,
         **unused):
    """Eq. 12: ``u <- S_{w/L}(u - (K u - b) / L)``. Returns ``(code, iterations)``.

    ``init`` is a code tuple, or ``None`` for zeros (whose first product is skipped). With ``tol > 0`` the
    KKT residual is checked on the schedule of ``check_every`` (see the module docstring; a check costs a
    few element-wise operations and one host read, the product ``K u`` is shared with the step). ``record``
    (a list) receives the code after every iteration. ``metric``: as :func:`fista`'s (to a tolerance, the
    operator's metric where it offers one; a fixed budget takes Eq. 12's steps)."""
    _reject(unused, "ista", ("check_every", "metric"))
    prox = _prox_steps(op, w, L, tol, metric)
    zero = init is None
    u = tuple(torch.zeros_like(b) for b in B) if zero else tuple(init)
    buf = _Buffers(record is None and all(_inplace(b) for b in B), B)
    fr = _Freezer(op, u, tol, check_every, trace, max_iter, buf, B=B)
    it = 0
    for it in range(max_iter + 1):
        if tol <= 0 and it == max_iter:
            break
        if zero and it == 0:
            grad = tuple(torch.neg(b, out=o) for b, o in zip(B, buf.get("g")))
        else:
            grad = buf.gradient(op.gram_apply(u), B)
        if fr.check(it, u, grad, w) or it == max_iter:
            break
        u = tuple(p(ui, g, out=o) for p, ui, g, o in zip(prox, u, grad, buf.next_code()))
        _record(record, u)
    return fr.result(u, it)


def fista(op, B, w, L, init, *, tol, max_iter, check_every="auto", restart=True, metric="auto", trace=None,
          record=None, **unused):
    """FISTA (Beck & Teboulle, 2009) with optional gradient-based adaptive restart
    (O'Donoghue & Candes, 2015). One product with ``K`` per iteration. Returns ``(code, iterations)``.

    ``metric``: the steps' metric. ``"auto"`` (the default): to a tolerance, the operator's own
    (:meth:`vars_ode.lasso.Operator.metric`; a layer's random features offer a rank-one one, which halves the
    iterations of the convolutional VARS-SD equilibrium, and so does a Gram matrix with a dominant direction, such
    as a dictionary of positive atoms), the scalar bound ``L`` otherwise; with a fixed budget
    (``tol = 0``) always ``L``, so that the iterates are those of the paper's steps. ``"none"``: ``L``; or a
    :class:`vars_ode.lasso.RankOneMetric`."""
    _reject(unused, "fista", ("check_every", "restart", "metric"))
    prox = _prox_steps(op, w, L, tol, metric)
    zero = init is None
    u = tuple(torch.zeros_like(b) for b in B) if zero else tuple(init)
    Ku = tuple(torch.zeros_like(b) for b in B) if zero else op.gram_apply(u)
    y, Ky = u, Ku
    t = op.problems_like(u, 1.0)
    buf = _Buffers(record is None and all(_inplace(b) for b in B), B)
    fr = _Freezer(op, u, tol, check_every, trace, max_iter, buf, B=B)
    it = 0
    for it in range(max_iter + 1):
        # the check's gradient K u - b in g's buffer (written again below); its work in r1, r2 (the restart test's), r3
        if fr.check(it, u, lambda: buf.gradient(Ku, B), w) or it == max_iter:
            break
        g = buf.gradient(Ky, B)
        u_next = tuple(p(yi, gi, out=o) for p, yi, gi, o in zip(prox, y, g, buf.next_code()))
        last = tol <= 0 and it + 1 == max_iter
        Ku_next = Ku if last else op.gram_apply(u_next)  # the last product of a fixed budget is never used
        t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        beta = (t - 1) / t_next
        if restart:
            # restart the momentum where it points uphill: (y - u_next) . (u_next - u) > 0
            bad = sum(op.reduce(i, torch.mul(torch.sub(yi, ni, out=o1), torch.sub(ni, ui, out=o2), out=o1))
                      for i, (yi, ni, ui, o1, o2) in enumerate(zip(y, u_next, u, buf.get("r1"), buf.get("r2")))) > 0
            beta = torch.where(bad, torch.zeros_like(beta), beta)
            t_next = torch.where(bad, torch.ones_like(t_next), t_next)
        # y = u_next + beta (u_next - u), and K y from the products already made: one pass each (lerp towards the
        # previous point with weight -beta)
        nbs = tuple(op.expand(i, -beta) for i in range(op.num_blocks))
        y = tuple(torch.lerp(ni, ui, nb, out=o) for ni, ui, nb, o in zip(u_next, u, nbs, buf.get("y")))
        if not last:
            Ky = tuple(torch.lerp(kn, k, nb, out=o) for kn, k, nb, o in zip(Ku_next, Ku, nbs, buf.get("Ky")))
        u, Ku, t = u_next, Ku_next, t_next
        _record(record, u)
    return fr.result(u, it)


def _reject(unused, solver, known):
    if unused:
        raise ValueError(f"unknown option(s) {sorted(unused)} for solver {solver!r}; valid options: {sorted(known)}")


def active_set(op, B, w, L, init, *, tol, max_iter, first_chunk=32, metric="auto", trace=None, **unused):
    """FISTA with Newton polishing on the active set, for solutions to machine precision.

    Chunks of FISTA iterations (``first_chunk``, then doubling) alternate with a polish step: on
    the current support ``S`` with signs ``s``, solve ``K_SS u_S = b_S - w s_S`` (a batched Cholesky
    solve, one support per unfinished problem). A problem takes the polished point when its KKT
    residual is at or below ``tol``, which happens as soon as FISTA has found the support and signs;
    the others continue with FISTA. ``max_iter`` bounds the FISTA iterations; polish steps count
    as one iteration each. With ``tol = 0``: ``max_iter`` FISTA iterations and one polish step.
    ``metric``: FISTA's (:func:`fista`). Needs an operator with a Gram matrix (:attr:`Operator.has_gram`).
    Returns ``(code, iterations)``.
    """
    _reject(unused, "active_set", ("first_chunk", "metric"))
    K = op.gram()
    wk = op.expand(0, w)

    def resid(c):
        return residual_from_grad(op, tmap(torch.sub, op.gram_apply(c), B), c, w)

    def polish(c, compact=True):
        return (_polish(K, B[0], wk, c[0], compact),)

    if tol <= 0:
        # fixed budget (an attention layer's `steps`): FISTA, then one Newton step on the support
        # found, kept where it lowers the KKT residual; no host synchronisation
        u, iters = fista(op, B, w, L, init, tol=0, max_iter=max_iter)
        cand = polish(u, compact=False)
        return op.where(resid(cand) < resid(u), cand, u), iters + 1
    u = init
    iters = op.problems_like(B, 0, torch.long)
    spent, chunk = 0, int(first_chunk)
    while spent < max_iter:
        n = min(chunk, max_iter - spent)
        u, it = fista(op, B, w, L, u, tol=tol, max_iter=n, metric=metric)
        iters = iters + it
        spent += n
        r = resid(u)
        todo = (r > tol) & torch.isfinite(r)
        if trace is not None:  # the work done so far (FISTA's chunks stop where their problems converge)
            trace.append((int(iters.amax()), float(r.amax())))
        if not bool(todo.any()):
            break
        cand = polish(u)
        rc = resid(cand)
        take = todo & (rc <= tol)
        u = op.where(take, cand, u)
        iters = iters + todo
        if trace is not None:  # after the polish (a step of work for the problems still above tol)
            trace.append((int(iters.amax()), float(torch.where(take, rc, r).amax())))
        if not bool((todo & ~take).any()):
            break
        chunk *= 2
    return u, iters


def _polish(K, B, w, u, compact=True):
    """Solve ``K_SS v_S = b_S - w sign(u_S)`` on each column's support ``S``; ``v`` is zero off ``S``
    (:func:`vars_ode.ops.support_solve`; ``compact=False`` keeps the ``m x m`` systems and reads nothing from the
    device). Columns whose factorisation fails or is singular to working precision come back unchanged.
    """
    D = (u != 0).to(K.dtype)
    sol, ok = support_solve(K, D, D * (B - w * torch.sign(u)), compact=compact)
    return torch.where(ok.unsqueeze(-2) & torch.isfinite(sol), sol, u)
