"""Fixed-budget ISTA with the residual formed in the signal: the backend of ``ista`` for atoms in operator form.

For atoms whose ``K u`` is ``P^T (P u)`` (the convolutional templates and their union with random features,
:class:`vars_ode.dictionaries.Atoms`), Eq. 12's step ``u <- S_{w/L}(u - (K u - b) / L)`` is, in the scaled code
``s = L u`` (``L`` per problem),

    s <- S_w(s - P^T (diag(1/L) P s - x)),

the same iterates up to rounding. ``P`` acts on each problem's column of the signal ``(B, h, N, dh)``, so the
per-problem ``1 / L`` scales the signal (``1 / r`` of the code's size for ``r`` templates per channel), not the
code; the residual ``P u - x`` is taken on the signal instead of ``K u - b`` on the code, ``b = P^T x`` is
never formed, and the threshold is the scalar ``w`` (``softshrink``). Per step: two element-wise passes over
the code where the generic step (:func:`vars_ode.solvers.iterative.ista`) takes four. Forward + backward of a
layer (``benchmarks/RESULTS.md``): VARS-S 1.3x, VARS-SD with the templates 1.25x faster.

Covers: a float weight ``w``, ``steps >= 1``, zeros or ``b = P^T x`` as the initial code, unrolled gradients. The layer chooses it
(:meth:`vars_ode.VARSLayer._sparse`); everything else takes :func:`vars_ode.solvers.solve_problem`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


INITS = ("zeros", "encode")


def covers(atoms, w, steps, init, grad, options) -> bool:
    """Whether :func:`ista_in_signal_space` computes what ``solve_problem(atoms, ..., "ista")`` would; ``init``
    one of :data:`INITS` (``"encode"``: ``solve_problem``'s ``init=atoms.encode(x)``)."""
    return (hasattr(atoms, "decode") and not atoms.has_gram and isinstance(w, float) and w >= 0
            and isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1 and init in INITS
            and grad == "unroll" and not options)


def ista_in_signal_space(atoms, x: torch.Tensor, w: float, steps: int, dropout=None, init: str = "zeros"):
    """``steps`` ISTA steps on the LASSO of ``atoms`` and the signal ``x`` ``(B, h, N, dh)``, from zeros or
    (``init="encode"``) from ``b = P^T x``.

    Returns ``(recon, code)``: ``P u`` (with ``dropout``, a callable, applied to the code first) and a function
    giving the code ``u`` (a tuple, detached; for statistics)."""
    L = atoms.lipschitz().detach()                           # per problem, (B, h, dh) or broadcastable to it
    inv = 1.0 / L
    on_signal = inv.unsqueeze(-2) if inv.dim() else inv      # over the tokens of each problem's column

    def decode(code):
        return atoms.decode(code) * on_signal

    if init == "encode":  # s = L b, then every step
        s = tuple(b * atoms.expand(i, L) for i, b in enumerate(atoms.encode(x)))
        todo = steps
    else:  # the first step from zeros: s = S_w(P^T x)
        s = tuple(F.softshrink(b, w) for b in atoms.encode(x))
        todo = steps - 1
    for _ in range(todo):
        g = atoms.encode(decode(s) - x)
        s = tuple(F.softshrink(si - gi, w) for si, gi in zip(s, g))
    recon = decode(s if dropout is None else tuple(dropout(si) for si in s))
    kept = tuple(si.detach() for si in s)
    return recon, lambda: tuple(si * atoms.expand(i, inv) for i, si in enumerate(kept))
