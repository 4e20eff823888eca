"""``VARSLayer``: VARS attention as a drop-in replacement for timm's ``Attention``.

For an input ``x`` of shape ``(B, N, C)`` (``h`` heads of ``dh = C / h`` channels) the layer

1. projects the queries ``q`` and values ``v`` (``qkv``: ``C -> 2C``; keys are tied to the queries, as
   in the official code; the static-only dictionary needs no queries and has ``v``: ``C -> C``);
2. binds its dictionary ``P`` to this input (static templates on the token grid, random features
   ``Phi(q)`` of the queries, or both; see :mod:`vars_ode.dictionaries`);
3. solves, for every channel ``mu`` of every head, the sparse reconstruction of the value
   (paper Eq. 10 / 16; L1 weight ``lam`` under the default ``convention="eq10"``)::

       u*^mu = argmin_u 0.5 ||P u - v^mu||^2 + lam ||u||_1

   approximately, with any solver of :data:`vars_ode.SOLVERS` on the problem rescaled by its
   Lipschitz constant ``L``: ``steps`` ISTA / FISTA iterations, or an ODE solve of Eq. 8-9 over a
   horizon of ``steps`` (time units of about one ISTA step each), or (``steps=None``) to a KKT
   residual of ``tol``. The trained layer is a few-step approximation, not the equilibrium;
4. decodes ``P u*`` and outputs ``proj(P u* + v)`` (``residual="value"``, the paper's Eq. 17 with the
   value as ``X``) or ``proj(P u*)`` (``residual="none"``, the official code: there the "+ X" of
   Eq. 17 is the transformer block's own skip connection ``x + attn(norm(x))``).

The dynamic dictionary is solved in Gram form (``K = Phi^T Phi``: ``(B, h, m, m)``, ``B = Phi^T V``:
``(B, h, m, dh)``) with the core solvers, so the token count enters only the two products that
form them (and the decoding); with ``steps`` ISTA / FISTA iterations and unrolled gradients (the
default) the whole solve is one fused autograd node (:mod:`vars_ode.fused`) that keeps no ``N x m``
tensor for the backward pass; so is an integration to a horizon with a native ODE method (unrolled, or its
discrete adjoint with ``grad="adjoint"``). The static and union dictionaries are solved in operator form
(:func:`vars_ode.solvers.solve_problem` on the bound atoms). Fixed budgets (``steps`` given) never synchronise
with the host, except inside torchdiffeq (``grad="adjoint"`` with the convolutional atoms, the methods that
:mod:`vars_ode.solvers.native` does not have, or ``solver_options={"integrator": "torchdiffeq"}``), whose
step loops wait on the device at every step, and the adaptive native methods (a read every few attempts). Under
autocast (bf16 / fp16) the iteration runs in float32; the projections, and on the fused path the
products over the tokens, follow autocast.

Prefix tokens (CLS, distillation, register tokens; ``num_prefix_tokens``, ``"auto"`` infers it from
a square grid) are not on the token grid. The dynamic atoms cover them like any token. The static
atoms are zero on them, so for ``dictionary="s"`` a prefix token would receive nothing from the
image; it receives instead the mean of the reconstruction over the grid tokens (a global-pool
read-out, documented choice). For ``"sd"`` the dynamic atoms reconstruct them.

``compat="official"`` builds :class:`vars_ode.official.OfficialVARSAttention` instead: the official code's
``VARS_D`` / ``VARS_SD`` attention modules, with their parameter names and numerics (a subclass of this
layer that replaces its dictionary and solve; see :mod:`vars_ode.official`).

Self-attention as a special case (paper Sec. 3.4): with ``dictionary="d"``, ``lam=0``, ``init="zeros"`` and one
Euler step of size one (``solver="euler", steps=1, solver_options={"options": {"step_size": 1.0}}``, or one ISTA
step), the layer computes ``proj(Phi Phi^T V / L + V)``: Performer-style linear attention with keys tied to
queries, normalised by ``L``, the largest eigenvalue of ``Phi^T Phi`` (the rescaling that makes one unit of
time one ISTA step; the paper's Eq. 14 leaves the normalisation out).

:func:`replace_attention` swaps timm ``Attention`` modules for VARS layers in a built model and
:func:`attention_maps` records the per-iteration maps of every VARS layer (paper Figs. 3, 5, 7). While
recording, every dictionary is solved in operator form (:func:`vars_ode.solvers.solve_problem`,
the same iterates as the Gram-form path, with unrolled gradients), so that each iterate can be decoded.
"""
from __future__ import annotations

import contextlib
import inspect
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._validation import check_choice, check_positive
from .dictionaries import DenseStaticDictionary, DynamicDictionary, StaticDictionary, UnionDictionary, rebuild
from .fused import FUSED_ODE_METHODS, FUSED_SOLVERS, KERNELS, ODESpec, fused_attention_core
from .lasso import kkt_residual_operator, reduce_over
from .ops import CONVENTIONS, _kkt_residual_gram, penalty_weight
from .solvers import SOLVERS, check_solver, signal_ista, solve_problem
from .solvers.native import ADAPTIVE_TABLEAUX
from .solvers.ode import check_tolerances, choose_integrator, layer_settings

#: accepted names of the three dictionaries
DICTIONARIES = {
    "s": "s", "static": "s", "vars_s": "s", "vars-s": "s",
    "d": "d", "dynamic": "d", "vars_d": "d", "vars-d": "d",
    "sd": "sd", "union": "sd", "static+dynamic": "sd", "vars_sd": "sd", "vars-sd": "sd",
}
COMPATS = ("paper", "official")
#: the class that ``VARSLayer(compat=...)`` builds for each ``compat`` other than ``"paper"``; filled by
#: :mod:`vars_ode.official` when the package is imported
COMPAT_CLASSES: dict = {}
RESIDUALS = ("value", "none")
STATIC_KINDS = ("conv", "dense")
_DEFAULT = "default"
#: ``steps=EQUILIBRIUM`` is ``steps=None`` (solve to ``tol``), spelt so that it survives ``timm.create_model``
EQUILIBRIUM = "equilibrium"


def _reduce_atoms(i, t, op="sum"):
    # per-problem counts of a Gram-form code (B, h, m, dh): over the atoms, dimension -2 (a module-level
    # function, not a bound method of the atoms, which torch.compile could not keep in the layer's statistics)
    return reduce_over(t, -2, op)


class LayerStats:
    """Statistics of a layer's last forward pass; tensor fields are computed on first access, detached.

    Attributes:
        solver, unit: solver name and what ``iterations`` counts (iterations or function evaluations).
        iterations: 0-dim (or per problem) long tensor.
        residual: KKT residual per problem ``(B, h, dh)`` (the LASSO the solver targets; for
            ``compat="official"`` the effective problem with ``W K W`` and the learned ``lam``).
        nnz: non-zero code entries per problem ``(B, h, dh)``.
        sparsity: fraction of code entries exactly zero (0-dim).
        forced: for an adaptive pair on the native integrator with a budget of attempts
            (``solver_options={"options": {"fixed_attempts": n}}``), per problem ``(B, h, dh)``, how many times the
            budget's last attempt ended an integration on a step that the tolerance rejected (0 or 1: the horizon is
            one integration, with ``record_maps`` too): a budget too small for that problem,
            whose integration is then less accurate than ``rtol`` asks; ``None`` without a budget (nothing is forced
            then).
    """

    def __init__(self, solver, unit, iterations, code, residual_fn, reduce_fn, forced=None):
        # code: a tuple of code tensors, or a callable returning one (computed on first access)
        self.solver, self.unit, self.iterations, self.forced = solver, unit, iterations, forced
        self._code_src, self._residual_fn, self._reduce_fn = code, residual_fn, reduce_fn
        self._residual = None

    @property
    def _code(self):
        if callable(self._code_src):
            with torch.no_grad():
                self._code_src = self._code_src()
        return self._code_src

    @property
    def residual(self) -> torch.Tensor:
        if self._residual is None:
            with torch.no_grad():
                self._residual = self._residual_fn()
        return self._residual

    @property
    def nnz(self) -> torch.Tensor:
        return sum(self._reduce_fn(i, (c != 0).to(torch.float32)) for i, c in enumerate(self._code)).long()

    @property
    def sparsity(self) -> torch.Tensor:
        zeros = sum((c == 0).sum() for c in self._code)
        return zeros.float() / sum(c.numel() for c in self._code)

    def summary(self) -> str:
        forced = "" if self.forced is None else (f", budget of attempts too small for {int((self.forced > 0).sum())} "
                                                 f"of {self.forced.numel()} problems")
        return (f"{self.solver}: {int(self.iterations.max())} {self.unit}, KKT residual max "
                f"{float(self.residual.max()):.3g}, sparsity {float(self.sparsity):.3f}{forced}")

    def __repr__(self):
        return f"LayerStats(solver={self.solver!r}, unit={self.unit!r}, iterations={self.iterations})"


class VARSLayer(nn.Module):
    """VARS attention (Shi et al., ICML 2022): ``(B, N, C) -> (B, N, C)``, a drop-in for timm's ``Attention``.

    Arguments:
        dim: ``C``, the token width; num_heads: ``h`` (``dim`` must be divisible by it).
        dictionary: ``"s"`` (static, VARS-S), ``"d"`` (dynamic, VARS-D) or ``"sd"`` (union, VARS-SD);
            aliases ``"static"``, ``"dynamic"``, ``"union"``, ``"vars_s"``, ...
        solver: any name in :data:`vars_ode.SOLVERS` (``"ista"``, ``"fista"``, ``"dopri5"``, ``"rk4"``, ...).
        steps: ISTA / FISTA iterations, or the ODE horizon in the same units; ``None`` solves to a KKT
            residual of ``tol`` (default 1e-4) within ``max_iter``. Default 3 (paper), 5 for ``compat="official"``.
            For the equilibrium of ``"d"`` or ``static="dense"``, ``solver="admm"`` takes tens of iterations
            where ``"fista"`` takes hundreds (:mod:`vars_ode.solvers.admm`). ``"equilibrium"`` is the same as
            ``None``, for ``timm.create_model``, which drops every keyword argument whose value is ``None``.
        lam: L1 weight (non-negative; ``convention`` as in :mod:`vars_ode.ops`).
        grad: ``"unroll"``, ``"implicit"`` (every dictionary; conjugate gradients where ``K`` is not formed; the
            equilibrium's gradient, meant for ``steps=None``: with a fixed ``steps`` it warns where one is taken) or
            ``"adjoint"`` (ODE solvers; with ``steps=None`` the native methods only, whose discrete adjoint is the
            unrolled gradient: torchdiffeq's continuous adjoint is refused there).
        compat: ``"paper"`` or ``"official"`` (see the module docstring).
        qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer, device, dtype:
            as timm's ``Attention``. ``qk_norm`` normalises the queries (keys are tied to them);
            ``attn_drop`` is dropout on the sparse code (there are no attention weights).
        attn_head_dim, dim_out, gated: as timm's ``Attention`` (``attn_head_dim`` must be ``dim // num_heads``).
        rand_feat_dim_ratio: ``m = rand_feat_dim_ratio * head_dim`` random features per head.
        orthogonal_features: orthogonal random features (FAVOR+).
        atoms_per_channel, kernel_size, padding: the static templates (see :class:`StaticDictionary`).
        num_prefix_tokens: int or ``"auto"`` (``N - floor(sqrt(N))**2``); grid_size: ``(H, W)`` or ``None`` (square).
        residual: ``"value"`` (paper default) or ``"none"`` (official default).
        init: initial code ``"zeros"`` or ``"encode"`` (``P^T v``); ignored by ``compat="official"``.
        lipschitz: ``"power"``, ``"eigvalsh"`` or ``"official"`` for the dynamic ``L``.
        tol, max_iter: for ``steps=None``.
        solver_options: passed to the solver (e.g. ``{"options": {"step_size": 1.0}}``, ``{"rtol": 1e-4}``;
            ``{"options": {"fixed_attempts": 6}}`` gives an adaptive pair (dopri5, ...) a budget of attempts and no host
            read, for CUDA graphs and ``torch.compile``: :class:`vars_ode.solvers.native.AdaptiveRK`); with it (a
            fixed-step method needs none) ``"compile": True`` runs the fused node's integration and its reverse pass
            compiled by ``torch.compile`` (``"d"`` and ``static="dense"``; :mod:`vars_ode.solvers.compiled_ode`).
        image_size: token grid side of the official ``"sd"`` kernel and of ``static="dense"`` atoms (which
            use ``grid_size`` instead when it is given).
        static: the static atoms of ``"s"`` / ``"sd"``: ``"conv"`` (the paper's convolutional templates,
            ``atoms_per_channel`` per channel at every grid position; operator form) or ``"dense"``
            (``num_static_atoms`` learned maps over the token grid per head, as the official VARS-SD;
            Gram form, solved like VARS-D; see :class:`vars_ode.dictionaries.DenseStaticDictionary`).
        num_static_atoms: ``m_s`` for ``static="dense"`` (default ``head_dim``, which brings DeiT-Ti + VARS-SD to
            the paper's 5.8M parameters).
        record_maps: record per-iteration attention maps in ``last_maps`` (see :func:`attention_maps`).
        fused: run Gram-form dictionaries (``"d"``, or ``static="dense"``) with a fixed number of ISTA / FISTA
            steps and unrolled gradients as one autograd node with a hand-written backward
            (:func:`vars_ode.fused.fused_attention_core`); ``False`` takes the generic path (the same
            function and gradients, more time and memory).
        recompute: on the fused path, recompute the features and replay the iterations in the backward
            pass (``True``: activation memory about that of ``q`` and ``v``) or keep them (``False``: faster);
            at the equilibrium (``steps=None``, ``grad="implicit"``, every dictionary), build the dictionary again in
            the backward pass and attach the implicit gradient to the code already found (kept: ``q``, ``v`` and the
            code); ``None``: recompute on CUDA devices, keep elsewhere.
        kernels: what runs the fused path: ``"torch"`` (PyTorch operations) or ``"triton"`` (six Triton
            kernels, :mod:`vars_ode.triton_gram`; VARS-D, or VARS-SD with ``static="dense"``, with ISTA,
            ``lipschitz="power"``, no ``attn_drop``, head_dim up to 64 and up to 128 atoms per head; on CUDA
            devices, or in Triton's interpreter with ``TRITON_INTERPRET=1``).

    After a forward pass, ``last_stats`` (:class:`LayerStats`) describes the solve.
    """

    #: ``steps`` and ``residual`` when not given
    default_steps, default_residual = 3, "value"

    def __new__(cls, *args, **kwargs):
        # VARSLayer(compat="official") (also through a configured class) builds the class of COMPAT_CLASSES
        merged = {**getattr(cls, "_configured_defaults", {}), **kwargs}
        compat = merged.get("compat", "paper")
        target = COMPAT_CLASSES.get(compat) if isinstance(compat, str) else None
        if target is None or issubclass(cls, target):
            return super().__new__(cls)
        obj = super().__new__(target)
        if not isinstance(obj, cls):  # Python calls __init__ only on an instance of cls (not of a configured class)
            obj.__init__(*args, **merged)
        return obj

    def __init__(self, dim: int, num_heads: int = 8, *, dictionary: str = "sd", solver: str = "ista", steps=_DEFAULT,
                 lam: float = 0.3, grad: str = "unroll", compat: str = "paper", qkv_bias: bool = False,
                 qk_norm: bool = False, scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer=None, device=None, dtype=None, rand_feat_dim_ratio=2,
                 tol: float | None = None, max_iter: int = 10_000, num_prefix_tokens="auto", grid_size=None,
                 residual: str = _DEFAULT, init: str = "zeros", lipschitz: str = "power", convention: str = "eq10",
                 orthogonal_features: bool = False, atoms_per_channel: int = 5, kernel_size: int = 5,
                 padding: str = "zeros", image_size: int = 14, solver_options: dict | None = None,
                 record_maps: bool = False, attn_head_dim: int | None = None, dim_out: int | None = None,
                 gated: bool = False, fused: bool = True, recompute: bool | None = None, static: str = "conv",
                 num_static_atoms: int | None = None, kernels: str = "torch", **unknown):
        super().__init__()
        if unknown:
            valid = sorted(set(inspect.signature(VARSLayer.__init__).parameters) - {"self", "unknown"})
            raise ValueError(f"unknown VARSLayer argument(s) {sorted(unknown)}; valid arguments: {valid}")
        dd = dict(device=device, dtype=dtype)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive integer, got {num_heads!r}")
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        head_dim = dim // num_heads
        if attn_head_dim is not None and attn_head_dim != head_dim:
            raise ValueError(f"attn_head_dim must be None or dim // num_heads = {head_dim} for VARSLayer, got {attn_head_dim}")
        key = dictionary.lower() if isinstance(dictionary, str) else dictionary
        if key not in DICTIONARIES:
            raise ValueError(f"dictionary must be one of {sorted(set(DICTIONARIES))}, got {dictionary!r}")
        self.dictionary_kind = DICTIONARIES[key]
        check_choice("compat", compat, COMPATS)
        check_choice("static", static, STATIC_KINDS)
        check_positive("num_static_atoms", num_static_atoms, allow_none=True, integer=True)
        for name, v in (("image_size", image_size), ("atoms_per_channel", atoms_per_channel),
                        ("kernel_size", kernel_size)):
            check_positive(name, v, integer=True)
        self.static = static
        self.gram_form = self.dictionary_kind == "d" or static == "dense"
        check_choice("init", init, ("zeros", "encode"))
        check_choice("lipschitz", lipschitz, ("power", "eigvalsh", "official"))
        check_choice("convention", convention, CONVENTIONS)
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam >= 0 or not math.isfinite(lam):
            raise ValueError(f"lam must be a non-negative finite float, got {lam!r}")
        if steps == _DEFAULT:
            steps = self.default_steps
        self.compat = compat
        steps, tol = self._check_solver(solver, steps, tol, grad)
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if not (isinstance(rand_feat_dim_ratio, (int, float)) and not isinstance(rand_feat_dim_ratio, bool)
                and rand_feat_dim_ratio > 0 and round(rand_feat_dim_ratio * head_dim) >= 1):
            raise ValueError(f"rand_feat_dim_ratio must be a positive number, got {rand_feat_dim_ratio!r}")
        if num_prefix_tokens != "auto" and not (isinstance(num_prefix_tokens, int) and num_prefix_tokens >= 0):
            raise ValueError(f"num_prefix_tokens must be a non-negative integer or 'auto', got {num_prefix_tokens!r}")
        if grid_size is not None:
            grid_size = _check_grid(grid_size)
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        if residual == _DEFAULT:
            residual = self.default_residual
        check_choice("residual", residual, RESIDUALS)
        _check_solver_options(solver_options, solver, steps, grad)
        norm_layer = norm_layer or nn.LayerNorm

        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.num_features = int(round(rand_feat_dim_ratio * head_dim))
        self.solver, self.steps, self.tol, self.lam, self.grad = solver, steps, tol, float(lam), grad
        self.max_iter, self.init, self.lipschitz, self.convention = max_iter, init, lipschitz, convention
        self.num_prefix_tokens, self.grid_size, self.residual = num_prefix_tokens, grid_size, residual
        self.solver_options = dict(solver_options or {})
        self.record_maps = record_maps
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be True or False, got {fused!r}")
        if recompute is not None and not isinstance(recompute, bool):
            raise ValueError(f"recompute must be True, False or None, got {recompute!r}")
        self.fused, self.recompute = fused, recompute
        check_choice("kernels", kernels, KERNELS)
        if kernels == "triton":
            kind = self.dictionary_kind
            covered = dict(dictionary=kind == "d" or (kind == "sd" and static == "dense"), compat=compat == "paper",
                           fused=fused, solver=solver == "ista", steps=isinstance(steps, int), grad=grad == "unroll",
                           lipschitz=lipschitz == "power", attn_drop=attn_drop == 0, record_maps=not record_maps)
            missing = [k for k, ok in covered.items() if not ok]
            if missing:
                raise ValueError(f"kernels='triton' covers dictionary='d' (or 'sd' with static='dense'), "
                                 f"compat='paper', fused=True, solver='ista' with integer steps, grad='unroll', "
                                 f"lipschitz='power', attn_drop=0 and record_maps=False; these arguments differ: "
                                 f"{missing}")
            from .triton_gram import check_sizes  # when the layer is built, as the options above

            check_sizes(head_dim, self.num_features, (num_static_atoms or head_dim) if kind == "sd" else None)
        self.kernels = kernels
        self.last_stats: LayerStats | None = None
        self.last_maps: torch.Tensor | None = None
        uses_q = self.dictionary_kind != "s"

        if uses_q:
            self.qkv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        else:
            self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if (qk_norm and uses_q) else nn.Identity()
        self.gate = nn.Linear(dim, dim, bias=qkv_bias, **dd) if gated else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

        self._build_dictionary(dict(orthogonal_features=orthogonal_features, lipschitz=lipschitz,
                                    atoms_per_channel=atoms_per_channel, kernel_size=kernel_size, padding=padding,
                                    static=static, num_static_atoms=num_static_atoms, grid_size=grid_size,
                                    image_size=image_size, device=device, dtype=dtype))

    def _build_dictionary(self, cfg):
        # the learned and drawn parts of the dictionary (a subclass with other atoms replaces this)
        dd = dict(device=cfg["device"], dtype=cfg["dtype"])
        kind, h, dh = self.dictionary_kind, self.num_heads, self.head_dim
        if kind != "s":
            dyn = DynamicDictionary(h, dh, self.num_features, orthogonal=cfg["orthogonal_features"],
                                    lipschitz=cfg["lipschitz"], **dd)
        if kind != "d" and cfg["static"] == "dense":
            image_size = cfg["image_size"]
            st = DenseStaticDictionary(h, cfg["num_static_atoms"] or dh, cfg["grid_size"] or (image_size, image_size),
                                       **dd)
        elif kind != "d":
            st = StaticDictionary(self.dim, h, atoms_per_channel=cfg["atoms_per_channel"],
                                  kernel_size=cfg["kernel_size"], padding=cfg["padding"], **dd)
        self.dictionary = {"d": lambda: dyn, "s": lambda: st, "sd": lambda: UnionDictionary(dyn, st)}[kind]()

    # ------------------------------------------------------------------------------------------
    @classmethod
    def configure(cls, **defaults):
        """A subclass of this layer whose constructor defaults are ``defaults``.

        timm checks ``issubclass(attn_layer, ...)``, so a ``functools.partial`` cannot be passed as
        ``attn_layer``; this can::

            timm.create_model("deit_tiny_patch16_224", attn_layer=VARSLayer.configure(dictionary="d"))

        Keyword arguments given at construction still override ``defaults``.
        """
        valid = set(inspect.signature(VARSLayer.__init__).parameters) - {"self", "dim", "unknown"}
        bad = sorted(set(defaults) - valid)
        if bad:
            raise ValueError(f"unknown VARSLayer argument(s) {bad}; valid arguments: {sorted(valid)}")
        merged = {**getattr(cls, "_configured_defaults", {}), **defaults}
        base = cls

        def __init__(self, dim, *args, **kwargs):
            base.__init__(self, dim, *args, **{**merged, **kwargs})

        desc = ", ".join(f"{k}={v!r}" for k, v in merged.items())
        return type(f"{cls.__name__}Configured", (cls,), {
            "__init__": __init__, "_configured_defaults": merged, "__module__": cls.__module__,
            "__doc__": f"{cls.__name__} with defaults {desc}.",
        })

    # pickling (torch.save of a whole layer or model, sending it to another process): the statistics and maps of
    # the last forward pass hold closures over that pass and are not saved; a configured class
    # (VARSLayer.configure) is rebuilt from its base class and defaults, since it has no importable name
    def __getstate__(self):
        state = self.__dict__.copy()
        state["last_stats"], state["last_maps"] = None, None
        return state

    def __reduce_ex__(self, protocol):
        defaults = type(self).__dict__.get("_configured_defaults")
        if defaults is None:
            return super().__reduce_ex__(protocol)
        base = next(c for c in type(self).__mro__[1:] if "_configured_defaults" not in c.__dict__)
        return _rebuild_configured, (base, defaults, self.__getstate__())

    def set_solver(self, solver: str | None = None, *, steps=_DEFAULT, tol=_DEFAULT, grad: str | None = None,
                   solver_options: dict | None = None) -> "VARSLayer":
        """Swap the solver of a built (e.g. trained) layer, with the constructor's checks; returns ``self``.

        Only the arguments given change, except ``solver_options``: they belong to a solver, so a new solver
        without ``solver_options`` starts from none (FISTA's ``restart`` is no option of dopri5); ``tol``: a swap
        between a horizon and the equilibrium without ``tol`` takes the new kind's default (0 and 1e-4); and
        ``grad="implicit"``, the equilibrium's gradient: a swap from the equilibrium to a horizon without ``grad`` takes
        the horizon's default, ``"unroll"`` (the implicit gradient of a horizon is that of an equilibrium it did not
        reach, and warns at every call when a gradient is taken). A solver with no unrolled gradient (``"cd"``,
        ``"scipy_solver"``) without ``grad`` takes ``"implicit"``, so that a trained model evaluates with it as with any
        other; a later swap from it to a horizon of one that unrolls, without ``grad``, goes back to ``"unroll"``. A
        layer trained with ``"ista"`` can be evaluated with ``"dopri5"`` over the same horizon (or to its equilibrium
        with ``steps=None``).
        """
        solver = self.solver if solver is None else solver
        steps = self.steps if steps == _DEFAULT else steps
        to_equilibrium = steps is None or (isinstance(steps, str) and steps == EQUILIBRIUM)
        if tol == _DEFAULT:
            # a tolerance belongs to a kind of solve: kept within a horizon or within the equilibrium, the new kind's
            # default when a swap goes from one to the other (a horizon's 0 would run an equilibrium to max_iter)
            tol = self.tol if to_equilibrium == (self.steps is None) else None
        if grad is None:
            # so does the equilibrium's gradient: onto a horizon, the constructor's default; a solver with no unrolled
            # gradient (cd, scipy_solver) takes the one it has, and leaves it behind where it goes to one that unrolls
            if solver in SOLVERS and not SOLVERS[solver].unrolls:
                grad = "implicit"
            elif self.grad == "implicit" and not to_equilibrium and (
                    self.steps is None or not SOLVERS[self.solver].unrolls):
                grad = "unroll"
            else:
                grad = self.grad
        steps, tol = self._check_solver(solver, steps, tol, grad)
        if solver_options is None:
            solver_options = self.solver_options if solver == self.solver else {}
        _check_solver_options(solver_options, solver, steps, grad)
        self.solver_options = dict(solver_options)
        self.solver, self.steps, self.tol, self.grad = solver, steps, tol, grad
        return self

    @property
    def takes_budget(self) -> bool:
        """Whether the solver takes a budget of attempts, ``solver_options={"options": {"fixed_attempts": n}}``:
        an adaptive pair over a horizon (``steps``) on the native integrator (:func:`calibrate_budget`)."""
        return (self.solver in ADAPTIVE_TABLEAUX and self.steps is not None
                and self.solver_options.get("integrator", "auto") != "torchdiffeq")

    def set_budget(self, attempts: int) -> "VARSLayer":
        """Give the layer's adaptive pair a budget of ``attempts`` (``solver_options={"options": {"fixed_attempts":
        attempts}}``), every other solver option kept; returns ``self``. For a layer that :attr:`takes_budget`."""
        if not self.takes_budget:
            raise ValueError(f"set_budget: solver {self.solver!r} with steps={self.steps!r} takes no budget of attempts "
                             f"(an adaptive pair, {', '.join(ADAPTIVE_TABLEAUX)}, over a horizon, on the native "
                             "integrator)")
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"attempts must be a positive integer, got {attempts!r}")
        inner = {**(self.solver_options.get("options") or {}), "fixed_attempts": attempts}
        return self.set_solver(solver_options={**self.solver_options, "options": inner})

    def _check_solver(self, solver, steps, tol, grad):
        # shared by __init__ and set_solver; returns (steps, tol) with tol's default resolved
        if isinstance(steps, str) and steps == EQUILIBRIUM:
            steps = None
        check_solver(solver, grad)
        if grad == "unroll" and not SOLVERS[solver].unrolls:
            raise ValueError(f"solver {solver!r} cannot be differentiated through its iterations (grad='unroll'); "
                             "use grad='implicit'")
        is_ode = SOLVERS[solver].ode
        if steps is not None:
            ok = (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0) or (
                is_ode and isinstance(steps, float) and steps > 0)
            if not ok:
                raise ValueError(f"steps must be a positive integer (a positive float for ODE solvers) or None, got {steps!r}")
        if tol is None:
            tol = 1e-4 if steps is None else 0.0
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
            raise ValueError(f"tol must be a non-negative float or None, got {tol!r}")
        if SOLVERS[solver].needs_gram and not self.gram_form:
            raise ValueError(f"solver {solver!r} needs the Gram matrix, which dictionary {self.dictionary_kind!r} with "
                             "static='conv' does not form; use static='dense', or one of "
                             f"{sorted(n for n, sp in SOLVERS.items() if not sp.needs_gram)}")
        return steps, float(tol)

    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features (dynamic and union dictionaries)."""
        if hasattr(self.dictionary, "redraw_features"):
            self.dictionary.redraw_features(generator)

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, dictionary={self.dictionary_kind!r}, solver={self.solver!r}, "
                f"steps={self.steps}, lam={self.lam}, grad={self.grad!r}, compat={self.compat!r}, residual={self.residual!r}"
                + (f", static={self.static!r}" if self.dictionary_kind != "d" and self.dictionary is not None else "")
                + (f", kernels={self.kernels!r}" if self.kernels != "torch" else ""))

    # ------------------------------------------------------------------------------------------
    def _grid(self, N: int):
        p = self.num_prefix_tokens
        if self.grid_size is not None:
            H, W = self.grid_size
            if p == "auto":
                p = N - H * W
            if p < 0 or N - p != H * W:
                raise ValueError(f"grid_size {self.grid_size} and num_prefix_tokens {self.num_prefix_tokens} do not "
                                 f"match N = {N} tokens: the layer's static atoms are laid out on that grid, so an "
                                 f"input of another size (timm's dynamic_img_size) needs a model built at its size, "
                                 f"or dictionary='d'")
            return (H, W), p
        if p == "auto":
            s = math.isqrt(N)
            return (s, s), N - s * s
        s = math.isqrt(max(N - p, 0))
        if N - p <= 0 or s * s != N - p:
            raise ValueError(f"cannot infer a square token grid from N = {N} tokens with num_prefix_tokens = {p}; "
                             "set grid_size=(H, W) on the layer")
        return (s, s), p

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``x``: ``(B, N, C)`` -> ``(B, N, dim_out)``. ``attn_mask`` must be ``None`` and ``is_causal`` False
        (a sparse reconstruction has no pairwise scores to mask)."""
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported by VARSLayer (it has no pairwise attention scores); pass None")
        if is_causal:
            raise ValueError("is_causal=True is not supported by VARSLayer")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        B, N, C = x.shape
        if N == 0:
            raise ValueError(f"x has no tokens: shape {tuple(x.shape)}; a sparse reconstruction needs N >= 1")
        dev_type = x.device.type
        autocast_any = _autocast_enabled(dev_type)  # mixed dtypes are then autocast's to resolve
        autocast_on = autocast_any and dev_type in ("cpu", "cuda")  # where the layer itself solves in float32
        w = (self.v if self.dictionary_kind == "s" else self.qkv).weight
        if x.dtype != w.dtype and not autocast_any:
            raise ValueError(f"x has dtype {x.dtype} but the layer's parameters are {w.dtype}; convert one of them "
                             f"(x.to({w.dtype}) or layer.to({x.dtype})), or run under torch.autocast")
        h, dh = self.num_heads, self.head_dim
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        k = 1 if self.dictionary_kind == "s" else 2
        qv = (self.v(x) if k == 1 else self.qkv(x)).reshape(B, N, k, h, dh)
        out_dtype = qv.dtype
        work = torch.float32 if (qv.dtype in (torch.float16, torch.bfloat16) or autocast_on) and qv.dtype != torch.float64 else qv.dtype
        with torch.autocast(device_type=dev_type, enabled=False) if autocast_on else contextlib.nullcontext():
            if self._fusable():
                # one autograd node from the projection qv to the output layout (B, N, h, dh); q and v
                # stay in the autocast dtype
                low = torch.get_autocast_dtype(dev_type) if autocast_on else None
                out = self._sparse_fused(qv, low, N)
            elif self.kernels == "triton":
                raise ValueError(f"kernels='triton' needs the fused path (solver='ista' with integer steps, "
                                 f"grad='unroll', no solver_options), got solver={self.solver!r}, steps={self.steps!r}, "
                                 f"grad={self.grad!r}, solver_options={self.solver_options!r}")
            else:
                if k == 1:
                    q, v = None, qv[:, :, 0].transpose(1, 2)
                else:
                    q, v = qv.permute(2, 0, 3, 1, 4).unbind(0)
                    q = self.q_norm(q)
                q = q.to(work) if q is not None else None
                v = v.to(work)
                recon = self._sparse(q, v, N)
                out = (recon + v if self.residual == "value" else recon).transpose(1, 2)
        out = out.to(out_dtype).reshape(B, N, C)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        out = self.proj(out)
        return self.proj_drop(out)

    # ------------------------------------------------------------------------------------------
    def _fusable(self) -> bool:
        # the fused path (vars_ode.fused) covers Gram-form dictionaries with a fixed number of ISTA / FISTA
        # steps and unrolled gradients, and the native ODE methods over a horizon (unrolled or their discrete
        # adjoint); everything else takes the generic path
        if not (self.fused and self.gram_form and not self.record_maps):
            return False
        if self.solver in FUSED_ODE_METHODS:
            # under torch.compile the generic path's integration (traced, or eager for the adaptive methods, whose
            # loop reads the device) compiles in seconds; the node's would be traced through its host reads
            return (not torch.compiler.is_compiling() and self.steps is not None and self.grad in ("unroll", "adjoint")
                    and set(self.solver_options) <= {"rtol", "atol", "options"}
                    and self.solver_options.get("integrator", "auto") != "torchdiffeq")
        return (self.grad == "unroll" and self.solver in FUSED_SOLVERS and isinstance(self.steps, int)
                and set(self.solver_options) <= ({"restart"} if self.solver == "fista" else set()))

    def _parts(self):
        # (dynamic dictionary or None, static dictionary or None)
        d, kind = self.dictionary, self.dictionary_kind
        return {"d": (d, None), "s": (None, d), "sd": (getattr(d, "dynamic", None), getattr(d, "static", None))}[kind]

    def _sparse_fused(self, qv, low, N):
        # qv: (B, N, k, h, dh) -> (B, N, h, dh): P u* (+ v), through vars_ode.fused
        dyn, st = self._parts()
        if dyn is not None and not isinstance(self.q_norm, nn.Identity):
            qv = torch.stack([self.q_norm(qv[:, :, 0]), qv[:, :, 1]], 2)
        static, readout = None, False
        if st is not None:
            grid, p = self._grid(N)
            static = st.raw(grid, p)
            readout = self.dictionary_kind == "s" and p > 0  # prefix tokens of VARS-S
        weight = penalty_weight(self.lam, self.convention)
        ode = None
        if self.solver in FUSED_ODE_METHODS:
            ode = ODESpec(self.solver, self.steps, checkpoint=self.grad == "adjoint",
                          **layer_settings(self.solver, self.solver_options))
        out, replay = fused_attention_core(
            qv, dyn.rand_matrix if dyn is not None else None, weight, static=static, steps=self.steps,
            solver=self.solver, restart=self.solver_options.get("restart", True), init=self.init,
            lipschitz=self.lipschitz, power_iters=dyn.power_iters if dyn is not None else 10, low_dtype=low,
            recompute=self.recompute, dropout=self.attn_drop.p if self.training else 0.0,
            residual=self.residual == "value" and not readout, kernels=self.kernels, stats="lazy", ode=ode)

        def residual():  # KKT residual of the problem solved: K = (I - A) L, b = (b / L) L, code u' tau
            u, (A, bs, L, tau) = replay()
            K = (torch.eye(A.shape[-1], dtype=A.dtype, device=A.device) - A) * L
            return _kkt_residual_gram(K, bs * (tau * L), u * tau, weight)

        # the code and the problem are replayed from what the backward pass keeps when first asked for
        # (stats="lazy"), not held by the layer until its next call; u' has the zeros of the code u' tau
        # (tau > 0): the counts of LayerStats need no product
        work_done, unit = (ode.nfe, "function evaluations") if ode is not None else (self.steps, "iterations")
        self.last_stats = LayerStats(self.solver, unit, torch.full((), work_done, device=qv.device),
                                     lambda: (replay()[0],), residual, _reduce_atoms,
                                     forced=ode.forced if ode is not None else None)
        if readout:
            v = qv[:, :, -1].transpose(1, 2)
            recon = self._prefix_readout(out.transpose(1, 2), N)
            out = (recon + v.to(recon.dtype) if self.residual == "value" else recon).transpose(1, 2)
        return out

    def _bind(self, q, v, N):
        # the dictionary of this input, as an operator (vars_ode.dictionaries.Atoms)
        kind = self.dictionary_kind
        if kind == "d":
            return self.dictionary.bind(q)
        grid, p = self._grid(N)
        if self.gram_form:
            dyn, st = self._parts()
            return st.bind(grid, p, batch=v.shape[0], dynamic_raw=dyn.bind(q).raw if dyn is not None else None,
                           lipschitz=self.lipschitz)
        if kind == "s":
            return self.dictionary.bind(grid, p, dtype=v.dtype)
        return self.dictionary.bind(q, grid, p, dtype=v.dtype)

    def _sparse(self, q, v, N):
        # (B, h, N, dh) queries (None for "s") and values -> P u*: every dictionary and solver through the one
        # pipeline, vars_ode.solvers.solve_problem
        weight = penalty_weight(self.lam, self.convention)
        if (self.steps is None and self.grad == "implicit" and not self.record_maps and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()
                and (v.device.type == "cuda" if self.recompute is None else self.recompute)):
            return self._equilibrium_recomputed(q, v, N, weight)
        atoms = self._bind(q, v, N)
        spec = SOLVERS[self.solver]
        if (self.solver == "ista" and not self.record_maps
                and signal_ista.covers(atoms, weight, self.steps, self.init, self.grad, self.solver_options)):
            # the atoms in operator form, a fixed budget: ISTA with its residual on the signal (the same iterates)
            recon, code = signal_ista.ista_in_signal_space(atoms, v, weight, self.steps, dropout=self.attn_drop,
                                                           init=self.init)
            vd = v.detach()
            self.last_stats = self._operator_stats(atoms, code, lambda op: op.encode(vd), weight,
                                                   torch.full((), self.steps, device=v.device))
            return self._prefix_readout(recon, N)
        Bc = atoms.encode(v)
        record = [] if self.record_maps else None
        forced = None
        opts = dict(self.solver_options)
        if record is not None:
            opts["record"] = record
        if self.steps is None:
            budget = dict(tol=self.tol, max_iter=self.max_iter)
        elif spec.ode:
            budget = dict(tol=0.0, max_iter=self.max_iter, t_end=self.steps)
            opts = layer_settings(self.solver, opts)
            if self.solver in ADAPTIVE_TABLEAUX:  # a budget of attempts may force steps (LayerStats.forced)
                opts["forced"] = forced = []
        else:
            budget = dict(tol=0.0, max_iter=self.steps)
        code, iters = solve_problem(atoms, Bc, weight, self.solver, grad=self.grad,
                                    init=tuple(Bc) if self.init == "encode" else None, **budget, **opts)
        cd, Bd = tuple(c.detach() for c in code), tuple(b.detach() for b in Bc)
        self.last_stats = self._operator_stats(atoms, cd, lambda op: Bd, weight,
                                               iters.amax() if iters.numel() else iters.new_zeros(()))
        self.last_stats.forced = forced[0] if forced else None
        code = tuple(self.attn_drop(c) for c in code)
        recon = self._prefix_readout(atoms.decode(code), N)
        if record is not None:
            with torch.no_grad():
                maps = [self._prefix_readout(atoms.decode(c), N).abs().mean((1, 3)) for c in record]
                self.last_maps = torch.stack(maps, 1) if maps else None
        return recon

    def _equilibrium_recomputed(self, q, v, N, weight):
        # the equilibrium with grad="implicit", its dictionary recomputed in the backward pass: solved here without a
        # graph, then the part with gradients (dictionary, P^T v, the implicit code, P u) run under activation
        # checkpointing from (q, v, code): the backward pass builds the dictionary again and attaches the implicit
        # gradient to the same code (solve_problem's solution=) instead of solving again. What the layer keeps for
        # its backward pass is then q, v and the code, not the features, K and their products
        # (a gradient will be taken where anything requires one: the solve's warnings about it stay)
        gradient = any(t is not None and t.requires_grad for t in (q, v, *self.parameters()))
        with torch.no_grad():
            atoms = self._bind(q, v, N)
            Bc = atoms.encode(v)
            code, iters = solve_problem(atoms, Bc, weight, self.solver, grad="implicit", tol=self.tol,
                                        max_iter=self.max_iter, init=tuple(Bc) if self.init == "encode" else None,
                                        gradient=gradient, **self.solver_options)
        self.last_stats = self._operator_stats(atoms, code, lambda op: Bc, weight,
                                               iters.amax() if iters.numel() else iters.new_zeros(()))

        def attach(q_, v_, *code_):
            atoms_ = self._bind(q_, v_, N)
            c, _ = solve_problem(atoms_, atoms_.encode(v_), weight, self.solver, grad="implicit", tol=self.tol,
                                 max_iter=self.max_iter, solution=code_)
            return self._prefix_readout(atoms_.decode(tuple(self.attn_drop(x) for x in c)), N)

        return checkpoint(attach, q, v, *code, use_reentrant=False)

    def _operator_stats(self, atoms, code, b_of, weight, iterations):
        # LayerStats of a solve on atoms: code, a detached code tuple or a function giving one; b_of(op), b = P^T x.
        # The operator is kept as a recipe of detached tensors, with its blocks' atom dimensions: not the atoms
        # object, which keeps the autograd graph alive and which torch.compile cannot keep in a statistic
        recipe, dims = atoms.recipe(), tuple(atoms.reduce_dims(i) for i in range(atoms.num_blocks))

        def residual():
            op = rebuild(recipe)
            return kkt_residual_operator(op, stats._code, b_of(op), weight)

        stats = LayerStats(self.solver, SOLVERS[self.solver].unit, iterations, code, residual,
                           lambda i, t, op="sum": reduce_over(t, dims[i], op))
        return stats

    def _prefix_readout(self, recon, N):
        if self.dictionary_kind != "s":
            return recon
        _, p = self._grid(N)
        if p == 0:
            return recon
        mean = recon[:, :, p:].mean(-2, keepdim=True)
        return torch.cat([mean.expand(-1, -1, p, -1), recon[:, :, p:]], dim=-2)

def _rebuild_configured(base, defaults, state):
    # the unpickling side of VARSLayer.__reduce_ex__ for a layer of a configured class
    cls = base.configure(**defaults)
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _autocast_enabled(device_type: str) -> bool:
    # whether autocast is on for this device type; device types without autocast (meta) have none
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _check_solver_options(solver_options, solver, steps, grad):
    # a dict or None; its tolerances, and the integrator of an adjoint (every operator of a layer has the native
    # adjoint node), checked where they are given, before any forward pass
    if solver_options is not None and not isinstance(solver_options, dict):
        raise ValueError(f"solver_options must be a dict or None, got {type(solver_options).__name__}")
    solver_options = solver_options or {}
    check_tolerances(solver_options.get("rtol"), solver_options.get("atol"), solver)
    if grad == "adjoint":
        choose_integrator(solver_options.get("integrator", "auto"), solver, grad, node=True, horizon=steps is not None)


def _check_grid(grid_size):
    if (not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in grid_size)):
        raise ValueError(f"grid_size must be a pair of positive integers (H, W) or None, got {grid_size!r}")
    return tuple(grid_size)


def replace_attention(model: nn.Module, **layer_kwargs) -> nn.Module:
    """Swap every timm ``Attention`` in ``model`` for a :class:`VARSLayer` of the same width and heads.

    The query and value rows of timm's ``qkv`` (rows ``0:C`` and ``2C:3C``), ``proj``, ``q_norm`` and
    ``norm`` are copied where the shapes allow; the key rows are dropped (keys are tied to queries).
    ``num_prefix_tokens`` defaults to the model's own. Returns ``model`` (modified in place). A model with no timm
    ``Attention`` (Swin's ``WindowAttention``, EVA's ``EvaAttention``, BEiT's own class; or a model whose attention is
    already VARS) is refused with a ``ValueError`` that names the attention modules it has, rather than returned
    unchanged.
    """
    from timm.layers import Attention

    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Attention)]
    if not targets:
        done = sum(isinstance(m, VARSLayer) for m in model.modules())
        if done:
            raise ValueError(f"replace_attention: {type(model).__name__} has no timm Attention left to replace (its "
                             f"{done} attention layers are VARSLayer already); change their solver with "
                             "layer.set_solver(...) or build the model afresh")
        kinds = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})
        raise ValueError(f"replace_attention: {type(model).__name__} has no timm.layers.Attention to replace "
                         f"(attention modules found: {kinds or 'none'}); VARSLayer takes the place of the ViT family's "
                         "Attention (vit_*, deit_*); for a model built with attn_layer=, pass "
                         "attn_layer=vars_ode.VARSLayer.configure(...) to timm.create_model")
    if "num_prefix_tokens" not in layer_kwargs and hasattr(model, "num_prefix_tokens"):
        layer_kwargs["num_prefix_tokens"] = int(model.num_prefix_tokens)
    for name, old in targets:
        C = old.qkv.in_features
        if old.attn_dim != C:
            raise ValueError(f"{name}: attention width {old.attn_dim} differs from the model width {C}; "
                             "VARSLayer needs attn_head_dim = dim // num_heads")
        w = old.qkv.weight
        kw = dict(num_heads=old.num_heads, qkv_bias=old.qkv.bias is not None,
                  qk_norm=not isinstance(old.q_norm, nn.Identity), scale_norm=not isinstance(old.norm, nn.Identity),
                  proj_bias=old.proj.bias is not None, dim_out=old.proj.out_features,
                  attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p, device=w.device, dtype=w.dtype)
        if kw["qk_norm"] or kw["scale_norm"]:
            kw["norm_layer"] = type(old.q_norm if kw["qk_norm"] else old.norm)
        kw.update(layer_kwargs)
        new = VARSLayer(C, **kw)
        with torch.no_grad():
            if hasattr(new, "qkv"):
                new.qkv.weight.copy_(torch.cat([w[:C], w[2 * C:]]))
                if new.qkv.bias is not None and old.qkv.bias is not None:
                    new.qkv.bias.copy_(torch.cat([old.qkv.bias[:C], old.qkv.bias[2 * C:]]))
            else:
                new.v.weight.copy_(w[2 * C:])
                if new.v.bias is not None and old.qkv.bias is not None:
                    new.v.bias.copy_(old.qkv.bias[2 * C:])
            _copy_matching(new.proj, old.proj)
            _copy_matching(new.q_norm, old.q_norm)
            _copy_matching(new.norm, old.norm)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def _copy_matching(dst: nn.Module, src: nn.Module):
    sd, dd = src.state_dict(), dst.state_dict()
    for k, t in sd.items():
        if k in dd and dd[k].shape == t.shape:
            dd[k].copy_(t)


@torch.no_grad()
def calibrate_budget(model: nn.Module, *inputs, spare: int = 1) -> dict:
    """Give every :class:`VARSLayer` of ``model`` that integrates a horizon with an adaptive pair (native integrator) a
    budget of attempts (:meth:`VARSLayer.set_budget`) of what its adaptive loop takes on ``inputs``, plus ``spare``.

    Runs ``model(*inputs)`` once without a gradient, with the adaptive loop in those layers (their budgets and
    ``options["compile"]`` lifted for that pass, which reads the device as the loop does), then sets each layer's
    budget and keeps every other option, ``compile`` included. A budget the loop does not exhaust takes the loop's
    steps, so the loop's output and gradients (up to the rounding of the loop's last products, which its tail takes
    on fewer images), without a host read (a CUDA graph captures it, ``torch.compile`` traces it);
    harder inputs later may need more attempts than these ones took: a layer's ``last_stats.forced`` then counts
    the problems its budget ended on a step their tolerance rejected (README, "A budget of attempts"). Calibrate on
    a batch like the ones that follow, and again as training moves the weights (trained layers take more attempts
    than new ones).

    Returns ``{module name: attempts set}``.
    """
    if isinstance(spare, bool) or not isinstance(spare, int) or spare < 0:
        raise ValueError(f"spare must be a non-negative integer, got {spare!r}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, VARSLayer) and m.takes_budget}
    if not layers:
        raise ValueError(f"model has no VARSLayer integrating a horizon (steps) with an adaptive pair "
                         f"({', '.join(ADAPTIVE_TABLEAUX)}) on the native integrator: nothing to calibrate")
    before = {name: m.solver_options for name, m in layers.items()}
    try:
        for m in layers.values():
            inner = {k: v for k, v in (m.solver_options.get("options") or {}).items()
                     if k not in ("fixed_attempts", "compile")}
            m.solver_options, m.last_stats = {**m.solver_options, "options": inner}, None
        model(*inputs)
        attempts = {}
        for name, m in layers.items():
            if m.last_stats is None:
                raise ValueError(f"calibrate_budget: layer {name!r} did not run in model(*inputs); calibrate a model "
                                 "whose forward pass runs every layer that takes a budget")
            stages = len(ADAPTIVE_TABLEAUX[m.solver][0])  # FSAL: stages - 1 new evaluations an attempt
            # 1 evaluation at the start (2 where the first step is estimated), then stages - 1 an attempt
            attempts[name] = max(1, -(-(int(m.last_stats.iterations.max()) - 1) // (stages - 1)))
    except BaseException:
        for name, m in layers.items():
            m.solver_options = before[name]
        raise
    for name, m in layers.items():
        m.solver_options = before[name]
        attempts[name] += spare
        m.set_budget(attempts[name])
    return attempts


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> dict:
    """Per block and per solver iteration, the attention map of every :class:`VARSLayer` in ``model``.

    Runs ``model(images)`` once with recording switched on (and restores the flags). An ODE solver's horizon then
    integrates twice: once for the layer's output, as without recording, and once stopping at each unit of time for
    the maps (:func:`vars_ode.solvers.ode.ode_solve`). The map of an
    iterate ``u_t`` is ``mean over heads and channels of |P u_t|`` at each token, i.e. how strongly
    the current sparse reconstruction uses each token (paper Figs. 3, 5, 7).

    Returns:
        ``{module name: tensor (B, T, N)}`` with ``T`` the recorded iterations (ISTA / FISTA
        iterations, or unit time steps of an ODE solve; for ``compat="official"`` the code after each
        of its steps) and ``N`` all tokens, prefix tokens first (drop them and reshape to the grid to plot).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, VARSLayer)}
    if not layers:
        raise ValueError("model contains no VARSLayer")
    flags = {name: m.record_maps for name, m in layers.items()}
    try:
        for m in layers.values():
            m.record_maps, m.last_maps = True, None
        model(images)
        return {name: m.last_maps for name, m in layers.items() if m.last_maps is not None}
    finally:
        for name, m in layers.items():
            m.record_maps = flags[name]
