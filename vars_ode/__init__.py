"""vars_ode: Visual Attention from Recurrent Sparse reconstruction (Shi et al., ICML 2022) as
neural-ODE dynamics, solvers and attention layers.

Everything public is importable from here.
"""
from .dynamics import GramVARSDynamics, ReducedVARSDynamics, VARSDynamics, lca_field
from .gradients import GRAD_MODES, ImplicitLasso
from .ops import (CONVENTIONS, LIPSCHITZ_METHODS, gram, kkt_residual, kkt_residual_gram, lasso_objective,
                  lipschitz_constant, penalty_weight, soft_threshold)
from .solvers import ODE_SOLVERS, SOLVERS, Solution, SolverStats, Status, solve, solve_gram

__version__ = "0.1.0"

__all__ = [
    "CONVENTIONS", "GRAD_MODES", "LIPSCHITZ_METHODS", "ODE_SOLVERS", "SOLVERS",
    "GramVARSDynamics", "ImplicitLasso", "ReducedVARSDynamics", "Solution", "SolverStats", "Status",
    "VARSDynamics", "gram", "kkt_residual", "kkt_residual_gram", "lasso_objective", "lca_field",
    "lipschitz_constant", "penalty_weight", "soft_threshold", "solve", "solve_gram",
]
