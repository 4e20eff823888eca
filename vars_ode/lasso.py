"""The LASSO problem as every solver sees it: ``min_u 0.5 u^T K u - u^T b + w ||u||_1`` with ``K = P^T P``.

A solver never sees ``P`` or the signals, only an :class:`Operator` (how to apply ``K``, a Lipschitz bound,
how per-problem quantities map onto the code) and the right-hand side ``b = P^T x``. One interface serves

* :class:`GramOperator`: ``K`` as a matrix ``(..., m, m)``; a code is one block ``(..., m, k)`` whose
  columns are problems (:func:`vars_ode.solve`, :func:`vars_ode.solve_gram`, the dynamic and dense-static
  dictionaries of a layer);
* the atoms of a layer's dictionaries (:class:`vars_ode.dictionaries.Atoms`): convolutional templates and
  the union of templates and random features, where ``K`` is applied as ``P^T (P u)`` and never formed.

Codes are tuples of blocks (one per kind of atom). Per-problem tensors (``w``, ``L``, residuals, iteration
counts, status) have the problems' shape, the *reduced* shape: ``(..., k)`` for a Gram operator, ``(B, h, dh)``
for a layer's atoms. :meth:`Operator.expand` makes one broadcastable to a block and :meth:`Operator.reduce`
takes a block back to it.
"""
from __future__ import annotations

import math

import torch

from .ops import _soft, kkt_violation, lipschitz_constant, symmetric_matmul

#: a Gram matrix offers ISTA / FISTA a rank-one step metric (:meth:`GramOperator.metric`, the random features'
#: :meth:`vars_ode.dictionaries.DynamicAtoms.metric`) where every matrix's top eigenvalue is at least this many times
#: its second. On the Gram form a metric step costs about 2.5x a scalar one; FISTA to 1e-4 (B 8, N 197, 3 heads) was
#: 1.09x faster with it at a ratio of 4.5 (dh 8, 32 features), 1.21x at 7.8, 1.75x at 15.6 (DeiT-Ti's width;
#: benchmarks/RESULTS.md, twenty-seventh session)
SPIKE_RATIO = 4.0
#: power iterations (from the mean direction) behind the screen of :meth:`GramOperator.metric` on a batch of matrices
SCREEN_ITERS = 3


def _bcast(t, fn):
    # per-problem tensors of 0 dims (a global lam) broadcast everywhere as they are
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    return fn(t)


def take_groups(x, lead: tuple, index: torch.Tensor):
    """The groups ``index`` (into the leading dimensions ``lead`` of a Gram-form state ``lead + (m, k)``,
    flattened) of a tensor broadcastable to such a state or to ``lead + (m, m)``: ``(len(index), a, b)``. What
    has no leading dimensions of its own (a float, a tensor of at most two dimensions) is shared by every group and
    comes back as it is."""
    if not isinstance(x, torch.Tensor) or x.dim() <= 2:
        return x
    x = x.expand(*lead, *x.shape[-2:])
    return x.reshape(-1, *x.shape[-2:])[index]


def put_groups(x: torch.Tensor, lead: tuple, index: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``x`` (leading dimensions ``lead``) with its groups ``index`` (the leading dimensions flattened) replaced by
    ``part`` (``(len(index), ...)``), as a new tensor: the inverse of taking those groups."""
    return x.reshape(-1, *x.shape[len(lead):]).index_copy(0, index, part).reshape(x.shape)


def reduce_over(t, dims, op="sum"):
    """``t`` summed (``op="sum"``) or maximised (``"amax"``) over ``dims``."""
    return t.sum(dims) if op == "sum" else t.amax(dims)


def tmap(fn, *ts):
    """``fn`` applied block by block to tuples of blocks."""
    return tuple(fn(*args) for args in zip(*ts))


class Operator:
    """``K = P^T P`` of a batch of LASSO problems, applied to codes that are tuples of blocks.

    Subclasses implement :meth:`gram_apply`, :meth:`lipschitz`, :meth:`expand` and :meth:`reduce_dims`;
    :meth:`gram` where ``K`` is small enough to form (solvers that factorise ``K``, such as ``active_set``,
    need it). ``roots`` / ``with_roots`` (the tensors the operator is computed from, and the same operator
    on other ones) are needed by the ODE adjoint only.
    """

    #: number of code blocks
    num_blocks = 1

    def gram_apply(self, code: tuple) -> tuple:
        """``K u``: code tuple -> code tuple, in new tensors (the conjugate gradients of the implicit gradient
        write into them; one that shares the input's memory is copied first)."""
        raise NotImplementedError

    def gram_apply_into(self, code: tuple, out: tuple) -> tuple:
        """:meth:`gram_apply`, written into the tensors of ``out`` (shaped like ``code``) where the operator can
        (the Gram form does; the default allocates new tensors and ignores ``out``). Not for autograd."""
        return self.gram_apply(code)

    def gram(self) -> torch.Tensor:
        """The matrix ``K`` where it is small; raises otherwise."""
        raise NotImplementedError(f"{type(self).__name__} has no explicit Gram matrix; use gram_apply")

    @property
    def has_gram(self) -> bool:
        """Whether :meth:`gram` gives a matrix."""
        return type(self).gram is not Operator.gram

    def lipschitz(self) -> torch.Tensor:
        """A bound on the largest eigenvalue of ``K`` per problem (broadcastable to the problems' shape)."""
        raise NotImplementedError

    def expand(self, i: int, t):
        """Per-problem tensor -> broadcastable to block ``i`` (0-dim tensors and floats pass unchanged)."""
        raise NotImplementedError

    def reduce_dims(self, i: int):
        """The dimensions of block ``i`` over which a code's atoms run (those :meth:`reduce` reduces)."""
        raise NotImplementedError

    def reduce(self, i: int, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Block ``i`` tensor -> per-problem, by ``op`` in ``{"sum", "amax"}`` over the atoms."""
        return reduce_over(t, self.reduce_dims(i), op)

    def problems_like(self, code: tuple, fill=0, dtype=None) -> torch.Tensor:
        """A per-problem tensor of the problems' full shape, filled with ``fill``."""
        r = self.reduce(0, code[0], "amax")
        return torch.full(r.shape, fill, dtype=dtype or r.dtype, device=r.device)

    def where(self, mask: torch.Tensor, a: tuple, b: tuple) -> tuple:
        """Per problem, the blocks of ``a`` where ``mask`` holds, those of ``b`` elsewhere."""
        return tuple(torch.where(self.expand(i, mask), x, y) for i, (x, y) in enumerate(zip(a, b)))

    def norm(self, ts: tuple) -> torch.Tensor:
        """Per-problem error norm of a tuple whose entry ``j`` is shaped like block ``j % num_blocks``: the
        largest root-mean-square over the entries, each taken over its atoms."""
        out = None
        for j, t in enumerate(ts):
            i = j % self.num_blocks
            dims = self.reduce_dims(i)
            n = 1
            for d in (dims if isinstance(dims, tuple) else (dims,)):
                n *= t.shape[d]
            r = (self.reduce(i, t.pow(2)) / n).sqrt()
            out = r if out is None else torch.maximum(out, r)
        return out

    def residual_rounding(self, code: tuple, B: tuple, bound: bool = False):
        """Per problem, how far rounding may move an evaluation of the KKT residual of ``code``: ``eps`` times the
        largest ``(|K| |u| + |b|)_i``, the terms its gradient ``K u - b`` sums; where they are large against ``tol``,
        the residual is noise at the level of ``tol`` and more iterations do not lower it. ``bound=True``: an upper
        bound on it without a product (``eps (max |K_ij| ||u||_1 + ||b||_inf)``). ``None`` where the operator does
        not offer it (the default): its solves then stop at ``tol`` only."""
        return None

    def metric(self) -> "RankOneMetric | None":
        """A step metric tighter than :meth:`lipschitz` (:class:`RankOneMetric`), or ``None``: the proximal
        solvers' steps then use the scalar bound. The default offers none."""
        return None

    def roots(self) -> tuple:
        """Tensors from which everything the operator uses is computed, none a function of another."""
        return ()

    def with_roots(self, roots: tuple) -> "Operator":
        """The same operator rebuilt from other root tensors (the ODE adjoint solves on detached copies)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be rebuilt from its roots")


class GramOperator(Operator):
    """``K`` given as a matrix ``(..., m, m)``; a code is one block ``(..., m, k)``, each column a problem,
    and per-problem tensors are ``(..., k)``."""

    def __init__(self, K: torch.Tensor):
        self.K = K
        self._metric = None  # (metric or None,) once computed
        self._abs = self._top = None  # |K| and its largest entry per matrix, once asked for (residual_rounding)

    def gram_apply(self, code):
        return (symmetric_matmul(self.K, code[0]),)

    def gram_apply_into(self, code, out):
        return (symmetric_matmul(self.K, code[0], out=out[0]),)

    def gram(self):
        return self.K

    def lipschitz(self):
        return lipschitz_constant(self.K.detach()).unsqueeze(-1)

    def metric(self):
        """``lambda_2 I + (lambda_1 - lambda_2) v v^T`` per matrix (:func:`rank_one_metric`) where every matrix has a
        dominant direction, ``None`` elsewhere; computed once."""
        if self._metric is None:
            self._metric = (rank_one_metric(self.K),)
        return self._metric[0]

    def residual_rounding(self, code, B, bound=False):
        u, b = code[0], B[0]
        eps = torch.finfo(u.dtype).eps
        with torch.no_grad():  # a bound, never differentiated
            if bound:
                if self._top is None:
                    self._top = torch.linalg.vector_norm(self.K, math.inf, dim=(-2, -1)).unsqueeze(-1)
                return eps * (self._top * u.abs().sum(-2) + b.abs().amax(-2))
            if self._abs is None:
                self._abs = self.K.abs()
            return eps * (symmetric_matmul(self._abs, u.abs()) + b.abs()).amax(-2)

    def expand(self, i, t):
        return _bcast(t, lambda s: s.unsqueeze(-2))

    def reduce_dims(self, i):
        return -2

    def roots(self):
        return (self.K,)

    def with_roots(self, roots):
        return GramOperator(roots[0])

    def select_groups(self, lead: tuple, index: torch.Tensor) -> "GramOperator":
        """The operator of the groups ``index`` of a state ``lead + (m, k)`` (:func:`take_groups`)."""
        return GramOperator(take_groups(self.K, lead, index))


class RankOneMetric:
    """A step metric ``H = diag(scales) + rho v v^T`` with ``u^T K u <= u^T H u`` for every code ``u``.

    Where one direction dominates ``K`` (positive random features: their mean atom is an eigenvector with an
    eigenvalue 15x the next), the scalar bound ``L = lambda_1`` makes every proximal step as short as that direction
    needs; ``H`` keeps the short step on ``v`` only. ``scales``: per block, a per-problem tensor (the bound on that
    block away from ``v``); the rank-one part lies on block ``block``, whose atoms run along dimension -2 (the Gram
    form's layout and the random features'): ``v`` is ``(..., m, 1)``, broadcastable to that block, of unit norm over
    its atoms; ``rho`` per problem (at least 0). FISTA's steps in this metric: :func:`vars_ode.solvers.iterative.fista`
    (``metric=``)."""

    def __init__(self, scales: tuple, v: torch.Tensor, rho, block: int = 0):
        self.scales, self.v, self.rho, self.block = tuple(scales), v, rho, block

    def bound(self) -> torch.Tensor:
        """A scalar bound on ``K`` per problem from ``H >= K``: the largest scale plus ``rho`` (``H``'s top eigenvalue
        where there is one block), in the scales' shape."""
        top = self.scales[0]
        for s in self.scales[1:]:
            top = torch.maximum(top, s)
        return top + self.rho


def rank_one_split(K: torch.Tensor, margin: float = 0.01):
    """``K = lambda_1 v v^T + R`` with ``R <= lambda_2 I`` for a batch of symmetric matrices ``(..., m, m)``, from an
    eigendecomposition in ``K``'s precision (float32 at least; no graph). Returns ``(lambda_1, v, lambda_2)`` in ``K``'s
    dtype, shapes ``(...)``, ``(..., m)``, ``(...)``. The computed eigenpairs are exact for some ``K + E`` with
    ``|E| <= m eps lambda_1`` (a backward-stable eigensolver; ``eps`` of the working precision), so both eigenvalues
    are raised by that bound, which keeps ``lambda_2 I + (lambda_1 - lambda_2) v v^T >= K``, and then by the relative
    ``margin``. In float32 an eigendecomposition takes half the time of float64's (300 matrices of 128 x 128: 150
    against 286 ms; 24: 12 against 21 ms); the bound is then 1.5e-5 lambda_1 at 128 atoms, 0.06% of lambda_2 for the
    random features' ratio of 40; where float32 cannot resolve lambda_2 (ratios near 1e7) it raises lambda_2 enough
    to keep ``H`` a bound, and the metric's steps shorten."""
    with torch.no_grad():
        work = K.detach()
        if work.dtype not in (torch.float32, torch.float64):
            work = work.float()
        ev, vec = torch.linalg.eigh(work)
        top = ev[..., -1].clamp_min(0)
        second = ev[..., -2].clamp_min(0) if K.shape[-1] > 1 else torch.zeros_like(top)
        err = K.shape[-1] * torch.finfo(work.dtype).eps * top
        return (((top + err) * (1 + margin)).to(K.dtype), vec[..., -1].to(K.dtype),
                ((second + err) * (1 + margin)).to(K.dtype))


def dominant(split: tuple, min_ratio: float, also: torch.Tensor | None = None) -> bool:
    """Whether every matrix of a :func:`rank_one_split` has ``lambda_1 >= min_ratio * lambda_2`` and ``lambda_2 > 0``
    (the metric's gate), and ``also`` (a boolean tensor) holds: one read from the device."""
    lam1, _, lam2 = split
    ok = ((lam1 >= min_ratio * lam2) & (lam2 > 0)).all()
    return bool(ok if also is None else ok & also)


def rank_one_metric(K: torch.Tensor, min_ratio: float = SPIKE_RATIO) -> RankOneMetric | None:
    """The step metric ``H = lambda_2 I + (lambda_1 - lambda_2) v v^T >= K`` of a Gram-form operator ``K`` (``(...,
    m, m)``; codes ``(..., m, k)``), from :func:`rank_one_split`, or ``None`` where some matrix's ``lambda_1`` is less
    than ``min_ratio`` times its ``lambda_2`` (the metric would not pay for its steps), is 0, or ``K`` is not finite.

    Dictionaries of positive atoms, or of atoms sharing a mean (image patches that keep their brightness), have one
    dominant direction; ``min_ratio`` decides from the exact eigenvalues where ``K`` is one matrix (one read from the
    device). A batch of matrices (a dictionary per problem) is screened first by ``lambda_2 <= sqrt(||K||_F^2 -
    lambda_1^2)`` with ``lambda_1`` from a few power iterations (a lower bound, so the screen only passes matrices
    whose ratio is at least ``min_ratio``): one pass over ``K`` instead of an eigendecomposition per matrix, which
    costs about 170 products with it (300 matrices of 128 x 128) and would slow the batches where no metric is
    offered (two reads where the screen passes). The screen is conservative: matrices with a ratio of 14 read
    about 5."""
    K = K.detach()
    m = K.shape[-1]
    if m < 2:
        return None
    with torch.no_grad():
        frobenius = torch.linalg.vector_norm(K, dim=(-2, -1))  # not finite where an entry is not (or it overflows)
        finite = torch.isfinite(frobenius).all()
        if K.numel() > m * m:
            top = lipschitz_constant(K, "power", iters=SCREEN_ITERS)
            rest = (frobenius.square() - top.square()).clamp_min(0).sqrt()
            if not bool(finite & (top >= min_ratio * rest).all()):
                return None
        split = rank_one_split(torch.where(finite, K, torch.zeros((), dtype=K.dtype, device=K.device)))
        if not dominant(split, min_ratio, finite):
            return None
        lam1, v, lam2 = split
        return RankOneMetric((lam2.unsqueeze(-1),), v.unsqueeze(-1), (lam1 - lam2).unsqueeze(-1))


def tol_scale(op: Operator, B: tuple) -> torch.Tensor:
    """Per problem, ``max(1, ||b||_inf)`` (``||P^T x||_inf`` for a signal ``x``: the smallest weight at which the
    code is zero), the unit of a tolerance: a problem has converged when its KKT residual is at most
    ``tol * tol_scale``. Absolute for problems of unit scale or less, relative above; 1 where ``b`` is not finite."""
    s = None
    with torch.no_grad():
        for i, b in enumerate(B):
            r = op.reduce(i, b.detach().abs(), "amax")
            s = r if s is None else torch.maximum(s, r)
        return torch.where(torch.isfinite(s), s.clamp_min(1.0), torch.ones((), dtype=s.dtype, device=s.device))


def kkt_residual_operator(op: Operator, code: tuple, B: tuple, weight, Ku: tuple | None = None) -> torch.Tensor:
    """KKT residual per problem: the infinity norm of the minimum-norm subgradient of
    ``0.5 u^T K u - u^T b + weight ||u||_1`` at ``code``, zero exactly at a minimiser.

    ``B`` is the code tuple ``b``; ``weight`` a float or a per-problem tensor; ``Ku`` (``K u``) when already
    computed."""
    Ku = op.gram_apply(code) if Ku is None else Ku
    return residual_from_grad(op, tmap(torch.sub, Ku, B), code, weight)


def residual_from_grad(op: Operator, grad: tuple, code: tuple, weight, *, buffers: tuple | None = None) -> torch.Tensor:
    """:func:`kkt_residual_operator` from the gradient ``K u - b`` of the smooth part (a solver has it at hand).
    ``buffers``: per block, the three work tensors of :func:`vars_ode.ops.kkt_violation` (no graph)."""
    out = None
    for i, (g, u) in enumerate(zip(grad, code)):
        w = op.expand(i, weight)
        r = op.reduce(i, kkt_violation(g, u, w, buffers=None if buffers is None else buffers[i]), "amax")
        out = r if out is None else torch.maximum(out, r)
    return out


def objective(op: Operator, code: tuple, B: tuple, weight, Ku: tuple | None = None) -> torch.Tensor:
    """``0.5 u^T K u - u^T b + weight ||u||_1`` per problem (the LASSO objective less ``0.5 ||x||^2``)."""
    Ku = op.gram_apply(code) if Ku is None else Ku
    out = 0
    for i, (u, k, b) in enumerate(zip(code, Ku, B)):
        out = out + op.reduce(i, 0.5 * u * k - u * b + op.expand(i, weight) * u.abs())
    return out


def soft(code: tuple, thr: tuple) -> tuple:
    """Block-wise soft threshold."""
    return tmap(_soft, code, thr)
