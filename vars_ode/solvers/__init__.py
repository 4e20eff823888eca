"""Solvers for the VARS equilibrium: ISTA, FISTA, active set and every torchdiffeq method, one table of them
(:mod:`vars_ode.solvers.registry`) and one pipeline (:func:`solve_problem`) under every entry point."""
from ._solve import INITS, check_solver, solve, solve_gram, solve_operator, solve_problem
from ._types import Solution, SolverStats, Status
from .registry import ODE_SOLVERS, SOLVERS, SolverSpec, is_ode, register_solver, unregister_solver

__all__ = ["INITS", "ODE_SOLVERS", "SOLVERS", "Solution", "SolverSpec", "SolverStats", "Status", "check_solver",
           "is_ode", "register_solver", "solve", "solve_gram", "solve_operator", "solve_problem", "unregister_solver"]
