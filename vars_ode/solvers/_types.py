"""Result types shared by every solver."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch


class Status(IntEnum):
    """Per-problem outcome of a solve, stored in :attr:`SolverStats.status`."""

    CONVERGED = 0  #: KKT residual at or below ``tol``
    MAX_ITER = 1  #: the iteration / evaluation budget (or the fixed horizon) ran out first
    NONFINITE = 2  #: the problem's inputs, or its iterates, were not finite
    #: above ``tol`` by no more than the rounding of the residual's own evaluation (``eps`` times the largest
    #: ``(|K| |u| + |b|)_i``): ``tol`` is at the working precision's floor for this problem, where more iterations
    #: do not help and float64 or a larger ``tol`` does
    PRECISION = 3


@dataclass
class SolverStats:
    """Per-problem statistics of one solve; every tensor has the problems' leading shape.

    Attributes:
        iterations: ISTA / FISTA iterations, or vector-field evaluations for ODE solvers
            (see ``unit``), spent on each problem.
        residual: KKT residual of the returned code (:func:`vars_ode.kkt_residual`).
        objective: LASSO objective of the returned code (``nan`` when the constant
            ``0.5 ||x||^2`` was not supplied to a Gram-form solve, which then reports it without it).
        nnz: number of non-zero entries of the code.
        converged: ``residual <= tol`` in the tolerance's units (:func:`vars_ode.lasso.tol_scale`), up to the
            working precision's rounding (``ROUNDING_SLACK`` times its ``eps`` in those units).
        status: :class:`Status` codes as an integer tensor (``converged``; short of ``tol``: ``max_iter`` or
            ``precision``; ``nonfinite``).
        solver, unit: the solver's name and what ``iterations`` counts.
        trace: optional list of ``(iteration, max residual over active problems)`` pairs (from ``vo.solve`` and
            ``vo.solve_gram``, each residual in units of the problem's :func:`vars_ode.lasso.tol_scale`, the
            quantity ``tol`` is compared with).
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    objective: torch.Tensor
    nnz: torch.Tensor
    converged: torch.Tensor
    status: torch.Tensor
    solver: str
    unit: str
    trace: list = field(default_factory=list)

    def status_names(self):
        """The status of each problem as strings (``"converged"``, ``"max_iter"``, ``"nonfinite"``, ``"precision"``)."""
        names = {s.value: s.name.lower() for s in Status}
        flat = [names[int(v)] for v in self.status.reshape(-1).tolist()]
        if self.status.dim() == 0:
            return flat[0]
        import numpy as np

        return np.array(flat, dtype=object).reshape(tuple(self.status.shape)).tolist()

    def map(self, fn) -> "SolverStats":
        """Apply ``fn`` to every tensor field (reshape, index, move to a device)."""
        kw = {k: fn(getattr(self, k)) for k in ("iterations", "residual", "objective", "nnz", "converged", "status")}
        return SolverStats(**kw, solver=self.solver, unit=self.unit, trace=self.trace)

    def summary(self) -> str:
        it = self.iterations.float()
        return (f"{self.solver}: {self.unit} mean {it.mean().item():.1f} max {int(self.iterations.max())}, "
                f"residual max {self.residual.max().item():.2e}, converged {int(self.converged.sum())}/{self.converged.numel()}")


@dataclass
class Solution:
    """What :func:`vars_ode.solve` returns.

    Attributes:
        code: ``(..., m)`` the sparse code ``u*`` (Eq. 10).
        reconstruction: ``(..., d)`` ``P u*``.
        output: ``(..., d)`` ``z* = P u* + x`` (Eq. 11).
        stats: :class:`SolverStats`.

    For :func:`vars_ode.solve_gram`, ``code`` is ``(..., m, k)`` and the other two are ``None``.
    """

    code: torch.Tensor
    reconstruction: torch.Tensor | None
    output: torch.Tensor | None
    stats: SolverStats
