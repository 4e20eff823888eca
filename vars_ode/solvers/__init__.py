"""Solvers for the VARS equilibrium: ISTA, FISTA and every torchdiffeq method."""
from ._solve import INITS, ODE_SOLVERS, SOLVERS, solve, solve_gram
from ._types import Solution, SolverStats, Status

__all__ = ["INITS", "ODE_SOLVERS", "SOLVERS", "Solution", "SolverStats", "Status", "solve", "solve_gram"]
