"""vars_ode: Visual Attention from Recurrent Sparse reconstruction (Shi et al., ICML 2022) as
neural-ODE dynamics, solvers and attention layers.

Everything public is importable from here.
"""
from .dynamics import GramVARSDynamics, ReducedVARSDynamics, VARSDynamics, VARSField, lca_field
from .gradients import GRAD_MODES, ImplicitLasso
from .ops import (CONVENTIONS, LIPSCHITZ_METHODS, gram, kkt_residual, kkt_residual_gram, lasso_objective,
                  lipschitz_constant, penalty_weight, soft_threshold)
from .lasso import GramOperator, Operator, kkt_residual_operator
from .solvers import (ODE_SOLVERS, SOLVERS, Solution, SolverSpec, SolverStats, Status, register_solver, solve,
                      solve_gram, solve_operator, unregister_solver)
from .sync import count_host_syncs

__version__ = "0.1.0"

__all__ = [
    "CONVENTIONS", "GRAD_MODES", "LIPSCHITZ_METHODS", "ODE_SOLVERS", "SOLVERS",
    "GramOperator", "Operator", "SolverSpec", "kkt_residual_operator", "register_solver", "solve_operator",
    "unregister_solver", "VARSField",
    "GramVARSDynamics", "ImplicitLasso", "ReducedVARSDynamics", "Solution", "SolverStats", "Status",
    "VARSDynamics", "count_host_syncs", "gram", "kkt_residual", "kkt_residual_gram", "lasso_objective", "lca_field",
    "lipschitz_constant", "penalty_weight", "soft_threshold", "solve", "solve_gram",
]

# dictionaries and the attention layer
from .dictionaries import (Atoms, DenseStaticDictionary, DynamicDictionary, StaticDictionary,  # noqa: E402
                           UnionDictionary)
from ._workspace import release_workspace, set_cpu_workspace, workspace_bytes  # noqa: E402
from .fused import gram_sparse_code  # noqa: E402
from .layer import (DICTIONARIES, LayerStats, VARSLayer, attention_maps, calibrate_budget,  # noqa: E402
                    replace_attention)
from .official import OfficialVARSAttention  # noqa: E402  (registers VARSLayer(compat="official"))

__all__ += ["Atoms", "DICTIONARIES", "DenseStaticDictionary", "DynamicDictionary", "LayerStats", "OfficialVARSAttention", "StaticDictionary",
            "UnionDictionary", "VARSLayer", "attention_maps", "calibrate_budget", "gram_sparse_code",
            "release_workspace", "replace_attention", "set_cpu_workspace", "workspace_bytes"]

# host models; importing them registers the timm entrypoints vars_deit_tiny, vars_rvt_tiny, vars_gfnet_tiny
from .models import ATTENTIONS, PerformerAttention, load_official_checkpoint  # noqa: E402

__all__ += ["ATTENTIONS", "PerformerAttention", "load_official_checkpoint"]

# figures; matplotlib.pyplot is imported only when a function draws
from . import plot  # noqa: E402,F401
