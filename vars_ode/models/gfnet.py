"""GFNet-Ti* (Rao et al., 2021, as modified in the VARS paper) with a choice of token mixer.

GFNet-Ti: width 256, depth 12, MLP ratio 4, 16x16 patches, learned positional embedding, no class
token, mean-pooled tokens after the final LayerNorm (eps 1e-6). Its token mixer is a global filter
(a learned per-channel filter in 2-D Fourier space, :class:`GlobalFilter`), and its block has one
residual branch: x + mlp(norm2(filter(norm1(x)))). GFNet-Ti* adds the convolutional stem of Xiao et
al. (2021).

The VARS paper replaces the global operator by VARS. An attention mixer has no identity path of its
own (a global filter can represent the identity, attention's output cannot), so attention mixers
sit in the usual two-residual pre-norm block; ``mixer_residual`` makes that choice explicit and
can override it. Attention uses ``num_heads`` heads (default 4, head_dim 64 as in DeiT).

VARS-S in GFNet: the paper lists GFNet-Ti* + VARS-S with the parameters and FLOPs of GFNet-Ti*
itself (7.5M, 1.3 GFLOPs), which leaves no room for the value and output projections of an
attention layer (2 C^2 per block, +1.6M). So "vars_s" here puts a projection-free VARS-S in the
global filter's slot (:class:`StaticSparseCoding`): the sparse reconstruction P u* of each channel over
one learned circular template per channel spanning the token grid (the support of GFNet's filter),
u* = argmin 0.5 ||P u - x||^2 + lam ||u||_1, solved by the library's operator-form solvers. This is an
interpretation of the table, not the authors' code (they released none for GFNet).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._validation import check_choice
from ._attention import (ATTENTIONS, _normalize_layer_kwargs, attention_class, check_attention_kwargs,
                         full_grid_kernel_size)
from ._factory import create_host, host_cfg
from .layers import ConvPatchEmbed, GlobalFilter, LinearHead

__all__ = ["GFNET_MIXERS", "GFNetBlock", "GFNetStar", "StaticSparseCoding", "vars_gfnet_tiny"]

#: mixers of the GFNet host: its own global filter, then the attentions every host accepts
GFNET_MIXERS = ("gfnet",) + ATTENTIONS


class StaticSparseCoding(nn.Module):
    """Projection-free VARS-S token mixer: the sparse reconstruction of every channel over a static
    dictionary of translated templates.

    For each channel x^mu of the (B, N, C) input (N = h * w tokens on the grid),
    u* = argmin_u 0.5 ||P u - x^mu||^2 + lam ||u||_1 (``convention`` as in :mod:`vars_ode.ops`), and the
    output is P u*. P^T is a depthwise convolution with ``atoms_per_channel`` learned templates per
    channel (:class:`vars_ode.dictionaries.StaticDictionary`); with the defaults a single circular
    template as large as the grid, like GFNet's global filter.

    Arguments:
        dim: channels C.
        grid_size: token grid (h, w).
        lam, steps (or ``num_step``), solver, grad, convention, tol, max_iter, solver_options, init:
            as in ``VARSLayer`` (``grad`` "unroll" or, with an ODE solver, "adjoint").
        atoms_per_channel, kernel_size, padding: the templates (kernel_size default: the largest odd
            size not above min(grid_size)).

    Shapes:
        forward: x (B, N, C) -> (B, N, C).
    """

    def __init__(self, dim: int, grid_size: Tuple[int, int], *, lam: float = 0.3, steps: Optional[int] = 3,
                 solver: str = "ista", grad: str = "unroll", convention: str = "eq10", tol: Optional[float] = None,
                 max_iter: int = 10_000, solver_options: Optional[dict] = None, init: str = "zeros",
                 atoms_per_channel: int = 1, kernel_size: Optional[int] = None, padding: str = "circular") -> None:
        super().__init__()
        from ..dictionaries import StaticDictionary
        from ..ops import penalty_weight
        from ..solvers import check_solver

        check_solver(solver, grad)
        check_choice("init", init, ("zeros", "encode"))
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam >= 0:
            raise ValueError(f"lam must be a non-negative float, got {lam!r}")
        if steps is not None and not (isinstance(steps, (int, float)) and not isinstance(steps, bool) and steps > 0):
            raise ValueError(f"steps must be a positive number or None, got {steps!r}")
        self.grid_size = tuple(grid_size)
        if kernel_size is None:
            kernel_size = full_grid_kernel_size(self.grid_size)
        self.dictionary = StaticDictionary(dim, 1, atoms_per_channel=atoms_per_channel, kernel_size=kernel_size,
                                           padding=padding)
        self.lam, self.steps, self.solver, self.grad = float(lam), steps, solver, grad
        self.weight = penalty_weight(float(lam), convention)
        self.tol = (1e-4 if steps is None else 0.0) if tol is None else float(tol)
        self.max_iter, self.init = max_iter, init
        self.solver_options = dict(solver_options or {})

    @classmethod
    def from_layer_kwargs(cls, dim: int, grid_size: Tuple[int, int], **kwargs) -> "StaticSparseCoding":
        """Build from the keyword arguments a host passes to its attention layers.

        ``num_step`` is read as ``steps``. ``VARSLayer`` options that a projection-free static mixer
        has no use for (``rand_feat_dim_ratio``, ``residual``, ``lipschitz``, ...) are accepted and
        ignored, so one set of keywords serves every attention; ``compat="official"`` is rejected
        (the official code has no VARS-S attention module), as are unknown names.
        """
        import inspect

        kwargs = _normalize_layer_kwargs(kwargs)
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "dim", "grid_size"}
        try:
            from ..layer import VARSLayer
            layer = set(inspect.signature(VARSLayer.__init__).parameters) - {"self", "dim"}
        except ImportError:  # the layer module is optional
            layer = set()
        bad = sorted(set(kwargs) - own - layer)
        if bad:
            raise ValueError(f"attention='vars_s' in GFNet (a projection-free static sparse coding mixer) accepts "
                             f"{sorted(own)} (and ignores the other VARSLayer options), got {bad}")
        if kwargs.get("compat", "paper") != "paper":
            raise ValueError(f"compat must be 'paper' for attention='vars_s' in GFNet (the official code has no "
                             f"VARS-S attention module), got {kwargs['compat']!r}")
        return cls(dim, grid_size, **{k: v for k, v in kwargs.items() if k in own})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..solvers import solve_operator

        B, N, C = x.shape
        sig = x.unsqueeze(1)                                        # (B, 1, N, C): one head of C channels
        atoms = self.dictionary.bind(self.grid_size, 0, dtype=sig.dtype)
        Bc = atoms.encode(sig)
        w = torch.tensor(self.weight, dtype=sig.dtype, device=sig.device)
        code, _ = solve_operator(atoms, Bc, w, self.solver, steps=self.steps, tol=self.tol, max_iter=self.max_iter,
                                 grad=self.grad, init=self.init, options=dict(self.solver_options))
        return atoms.decode(code).squeeze(1)                        # (B, N, C)


class GFNetBlock(nn.Module):
    """A GFNet block around any token mixer.

    With ``mixer_residual=False`` (GFNet): x + drop_path(mlp(norm2(mixer(norm1(x))))).
    With ``mixer_residual=True`` (transformer): x + drop_path(mixer(norm1(x))), then
    x + drop_path(mlp(norm2(x))).

    The mixer is stored as ``filter`` when it is a :class:`GlobalFilter` (GFNet's name) and as
    ``attn`` otherwise.

    Shapes:
        forward: x (B, N, C) -> (B, N, C).
    """

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4., drop: float = 0.,
                 drop_path: float = 0., mixer_residual: bool = True, act_layer=nn.GELU,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6)) -> None:
        super().__init__()
        self.mixer_residual = mixer_residual
        self.norm1 = norm_layer(dim)
        self._mixer_name = "filter" if isinstance(mixer, GlobalFilter) else "attn"
        setattr(self, self._mixer_name, mixer)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self._mixer_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mixer_residual:
            x = x + self.drop_path(self.mixer(self.norm1(x)))
            return x + self.drop_path(self.mlp(self.norm2(x)))
        return x + self.drop_path(self.mlp(self.norm2(self.mixer(self.norm1(x)))))


class GFNetStar(LinearHead, nn.Module):
    """GFNet with a convolutional stem and a choice of token mixer.

    Arguments:
        img_size, patch_size, in_chans, num_classes: input, stride and classes (fixed resolution).
        embed_dim, depth, mlp_ratio: GFNet-Ti defaults 256, 12, 4.
        num_heads: heads of attention mixers (ignored by "gfnet").
        attention: one of "gfnet", "self", "performer", "vars_s", "vars_d", "vars_sd".
        attention_kwargs: keyword arguments of the attention layer (``lam``, ``steps``, ...).
        conv_stem: :class:`ConvPatchEmbed` (True, GFNet*) or a single patchify convolution (GFNet).
        mixer_residual: residual around the mixer; default False for "gfnet" and "vars_s" (they sit in
            the global filter's slot), True for attention.
        qkv_bias: biases of the attention's input projection.
        drop_rate: dropout after the positional embedding and in the MLPs.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linear from 0 to this value over the blocks.
        global_pool: only "avg".

    Shapes:
        forward: (B, in_chans, H, W) -> (B, num_classes); forward_features: -> (B, N, C).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 256,
            depth: int = 12,
            num_heads: int = 4,
            mlp_ratio: float = 4.,
            attention: str = "vars_sd",
            attention_kwargs: Optional[Dict[str, Any]] = None,
            conv_stem: bool = True,
            mixer_residual: Optional[bool] = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            global_pool: str = "avg",
    ) -> None:
        super().__init__()
        check_choice("attention", attention, GFNET_MIXERS)
        check_choice("global_pool", global_pool, ("avg",))
        attention_kwargs = check_attention_kwargs(attention_kwargs)
        if attention == "gfnet" and attention_kwargs:
            raise ValueError(f"attention='gfnet' takes no layer keyword arguments, got {sorted(attention_kwargs)}")
        if mixer_residual is None:
            mixer_residual = attention not in ("gfnet", "vars_s")
        self.attention = attention
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0

        embed_layer = ConvPatchEmbed if conv_stem else PatchEmbed
        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim)
        grid = tuple(self.patch_embed.grid_size)
        self.grid_size = grid
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        if attention == "gfnet":
            def make_mixer():
                return GlobalFilter(embed_dim, grid)
        elif attention == "vars_s":
            def make_mixer():
                return StaticSparseCoding.from_layer_kwargs(embed_dim, grid, **attention_kwargs)
        else:
            attn_layer = attention_class(attention, grid_size=grid, num_prefix_tokens=0, **attention_kwargs)

            def make_mixer():
                return attn_layer(embed_dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop_rate,
                                  proj_drop=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList([
            GFNetBlock(embed_dim, make_mixer(), mlp_ratio=mlp_ratio, drop=drop_rate, drop_path=dpr[i],
                       mixer_residual=mixer_residual)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head_drop = nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        reduction = self.patch_embed.feat_ratio() if hasattr(self.patch_embed, "feat_ratio") else patch_size
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"blocks.{i}") for i in range(depth)]

        trunc_normal_(self.pos_embed, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise lr decay): stem and positions, blocks in order, norm last."""
        return dict(stem=r"^pos_embed|^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature API: the tokens after each block in ``indices`` (int: the last n blocks) as
        (B, C, h, w) maps (or NHWC / NLC); ``norm`` applies the final LayerNorm to them."""
        if output_fmt not in ("NCHW", "NHWC", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW', 'NHWC' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        h, w = self.grid_size
        intermediates = []
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x)
            if i in take:
                y = self.norm(x) if norm else x
                if output_fmt != "NLC":
                    y = y.reshape(y.shape[0], h, w, -1)
                    y = y if output_fmt == "NHWC" else y.permute(0, 3, 1, 2)
                intermediates.append(y)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last one in ``indices`` (and the norm / head); returns the indices."""
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> normalised tokens (B, N, C)."""
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, C) -> logits (B, num_classes), or the mean token if pre_logits."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({"vars_gfnet_tiny": host_cfg()})


@register_model
def vars_gfnet_tiny(pretrained: bool = False, **kwargs) -> GFNetStar:
    """GFNet-Ti* (width 256, depth 12, conv stem), ~7.5M parameters with its global filter.

    ``attention`` picks "gfnet" (= GFNet-Ti*), "self", "performer", "vars_s", "vars_d" or "vars_sd";
    keywords not of :class:`GFNetStar` go to the attention layer.
    """
    model_args = dict(patch_size=16, embed_dim=256, depth=12, num_heads=4, mlp_ratio=4.)
    return create_host(GFNetStar, "vars_gfnet_tiny", pretrained, **dict(model_args, **kwargs))
