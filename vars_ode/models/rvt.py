"""RVT (Mao et al., 2021) as used by the official VARS code: the ``PoolingTransformer`` host.

``vars_rvt_tiny`` reproduces the official RVT-Ti (bfshi/VARS ``rvt/robust_models.py``, ``rvt_tiny``):

- stem: 7x7 stride-2 conv (32 channels) + BatchNorm + 3x3 stride-2 max-pool + 4x4 stride-4 conv
  (no activation), so 224 px -> 14 x 14 tokens;
- two stages of pre-norm blocks, base_dims [32, 32] x heads [6, 12] (widths 192 and 384), depth
  [10, 2], LayerNorm eps 1e-6, qkv bias;
- between stages a depthwise-strided "conv-head pooling" (3x3, stride 2, groups = input width);
- the MLP is 1x1 conv + BN + GELU, depthwise 3x3 conv + BN + GELU, 1x1 conv + BN on the token grid
  (``mlp_type="conv"``); the official code switches to a plain two-layer MLP when the width is 768,
  which is ``mlp_type="linear"`` here (per stage, explicitly);
- global average pooling, then LayerNorm, then the linear head.

Module and parameter names follow the official code (``patch_embed.proj.{0,1,3}``,
``transformers.{s}.blocks.{i}.{norm1,attn,norm2,mlp}``, ``pools.{s}.conv``, ``norm``, ``head``), so an
official checkpoint loads with :func:`vars_ode.models.load_official_checkpoint` when the attention
layer also uses the official names (``compat="official"``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import DropPath, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.utils.checkpoint import checkpoint

from .._validation import check_choice
from ._attention import ATTENTIONS, attention_class, check_attention_kwargs
from ._factory import create_host, host_cfg
from .layers import LinearHead
from .performer import MaskedSelfAttention

__all__ = ["ConvEmbedding", "ConvHeadPooling", "ConvMlp", "LinearMlp", "MLP_TYPES", "PoolingTransformer",
           "RVTBlock", "RVTStage", "vars_rvt_base", "vars_rvt_small", "vars_rvt_tiny"]

MLP_TYPES = ("conv", "linear")


class ConvEmbedding(nn.Module):
    """RVT's convolutional stem: (B, in_chans, H, W) -> (B, C, H', W'), H' = stem_output_size(H).

    ``proj`` = [Conv 7x7/2 pad 2 (``stem_chs``), BatchNorm, MaxPool 3x3/2 pad 1, Conv 4x4/4 (C)].
    """

    def __init__(self, in_chans: int, embed_dim: int, stem_chs: int = 32) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, stem_chs, kernel_size=7, stride=2, padding=2),
            nn.BatchNorm2d(stem_chs),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(stem_chs, embed_dim, kernel_size=4, stride=4),
        )

    @staticmethod
    def output_size(size: int) -> int:
        """Side of the token grid for an input side ``size`` (224 -> 14)."""
        size = (size + 4 - 7) // 2 + 1
        size = (size + 2 - 3) // 2 + 1
        return size // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class ConvHeadPooling(nn.Module):
    """Depthwise-strided downsampling between stages: (B, C_in, H, W) -> (B, C_out, H'', W'').

    ``conv`` is a (stride + 1) x (stride + 1) convolution with stride ``stride``, padding stride // 2
    and groups = C_in (so C_out must be a multiple of C_in).
    """

    def __init__(self, in_features: int, out_features: int, stride: int = 2) -> None:
        super().__init__()
        if out_features % in_features:
            raise ValueError(f"out_features ({out_features}) must be a multiple of in_features ({in_features})")
        self.stride = stride
        self.conv = nn.Conv2d(in_features, out_features, kernel_size=stride + 1, padding=stride // 2,
                              stride=stride, groups=in_features)

    def output_size(self, size: int) -> int:
        s = self.stride
        return (size + 2 * (s // 2) - (s + 1)) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConvMlp(nn.Module):
    """RVT's convolutional MLP on the token grid.

    fc1 (1x1 conv) -> bn1 -> act -> drop -> dwconv (3x3 depthwise) -> bn2 -> act -> fc2 (1x1 conv)
    -> bn3 -> drop.

    Shapes:
        forward: x (B, N, C), grid (h, w) with N = h * w -> (B, N, C).
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer=nn.GELU, drop: float = 0.) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.bn1 = nn.BatchNorm2d(hidden_features)
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, padding=1, groups=hidden_features)
        self.bn2 = nn.BatchNorm2d(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, 1)
        self.bn3 = nn.BatchNorm2d(out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        h, w = grid
        x = x.transpose(1, 2).reshape(B, C, h, w)
        x = self.drop(self.act(self.bn1(self.fc1(x))))
        x = self.act(self.bn2(self.dwconv(x)))
        x = self.drop(self.bn3(self.fc2(x)))
        return x.flatten(2).transpose(1, 2)


class LinearMlp(nn.Module):
    """Token-wise two-layer MLP (fc1 -> act -> drop -> fc2 -> drop); ``grid`` is ignored.

    Shapes:
        forward: x (B, N, C) -> (B, N, C).
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None,
                 out_features: Optional[int] = None, act_layer=nn.GELU, drop: float = 0.) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class RVTBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x), grid).

    Arguments:
        dim, num_heads: width and heads.
        attn_layer: attention class (or callable), called as ``attn_layer(dim, num_heads=, qkv_bias=, attn_drop=,
            proj_drop=)``; its forward maps (B, N, C) -> (B, N, C).
        mlp_type: "conv" (:class:`ConvMlp`) or "linear" (:class:`LinearMlp`).

    Shapes:
        forward: x (B, N, C), grid (h, w) with N = h * w -> (B, N, C).
    """

    def __init__(self, dim: int, num_heads: int, attn_layer: type, mlp_ratio: float = 4.,
                 mlp_type: str = "conv", qkv_bias: bool = True, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., act_layer=nn.GELU, norm_layer=partial(nn.LayerNorm, eps=1e-6)) -> None:
        super().__init__()
        check_choice("mlp_type", mlp_type, MLP_TYPES)
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        mlp_cls = ConvMlp if mlp_type == "conv" else LinearMlp
        self.mlp = mlp_cls(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x), grid))
        return x


class RVTStage(nn.Module):
    """A stage of :class:`RVTBlock` on a feature map (the official ``Transformer`` module).

    Shapes:
        forward: x (B, C, h, w) -> (B, C, h, w).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, attn_layer: type, mlp_ratio: float = 4.,
                 mlp_type: str = "conv", qkv_bias: bool = True, drop: float = 0., attn_drop: float = 0.,
                 drop_path: Sequence[float] = (), first_attn_layer: Optional[Any] = None,
                 first_blocks: int = 0) -> None:
        super().__init__()
        drop_path = list(drop_path) or [0.] * depth
        self.depth = depth
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            RVTBlock(dim, num_heads, first_attn_layer if i < first_blocks else attn_layer, mlp_ratio=mlp_ratio,
                     mlp_type=mlp_type, qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=drop_path[i])
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)                 # (B, N, C)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, (h, w), use_reentrant=False)
            else:
                x = blk(x, (h, w))
        return x.transpose(1, 2).reshape(B, C, h, w)


class PoolingTransformer(LinearHead, nn.Module):
    """RVT's pooling transformer with a choice of attention.

    Arguments:
        img_size: input side (int or (H, W)); fixes the token grids of static dictionaries.
        base_dims, depth, heads: per stage; stage width = base_dims[s] * heads[s].
        mlp_ratio: MLP hidden width / stage width.
        mlp_type: "conv" or "linear", one for all stages or one per stage (the official code uses
            "linear" exactly when the width is 768).
        num_classes, in_chans: head outputs and input channels.
        attention: one of "self", "performer", "vars_s", "vars_d", "vars_sd".
        attention_kwargs: keyword arguments of the attention layer (see
            :func:`vars_ode.models.attention_class`), e.g. ``dict(lam=0.3, steps=3, compat="official")``.
        qkv_bias: biases of the attention's input projection (official: True).
        drop_rate: dropout after the stem, in the MLPs and after the attention projection (official).
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, rising linearly as ``drop_path_rate * i / total_depth``.
        global_pool: only "avg" (average over the final grid).
        masked_blocks: RVT+ (the official ``rvt_*_plus``): the first ``masked_blocks`` blocks of the first
            stage use softmax attention with a learned position-aware scaling
            (:class:`~vars_ode.models.MaskedSelfAttention`); only with ``attention="self"`` (the official
            VARS blocks ignore the mask).

    Shapes:
        forward: (B, in_chans, H, W) -> (B, num_classes);
        forward_features: -> (B, C_last, h_last, w_last); forward_head: that -> (B, num_classes).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            base_dims: Sequence[int] = (32, 32),
            depth: Sequence[int] = (10, 2),
            heads: Sequence[int] = (6, 12),
            mlp_ratio: float = 4.,
            mlp_type: Union[str, Sequence[str]] = "conv",
            num_classes: int = 1000,
            in_chans: int = 3,
            attention: str = "vars_sd",
            attention_kwargs: Optional[Dict[str, Any]] = None,
            qkv_bias: bool = True,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            global_pool: str = "avg",
            masked_blocks: int = 0,
    ) -> None:
        super().__init__()
        check_choice("attention", attention, ATTENTIONS)
        if not isinstance(masked_blocks, int) or isinstance(masked_blocks, bool) or masked_blocks < 0:
            raise ValueError(f"masked_blocks must be a non-negative integer, got {masked_blocks!r}")
        if masked_blocks and attention != "self":
            raise ValueError(f"masked_blocks (RVT+ position masks) needs attention='self', got {attention!r}: the "
                             "official VARS and Performer blocks do not use the mask")
        check_choice("global_pool", global_pool, ("avg",))
        for name, v in (("base_dims", base_dims), ("depth", depth), ("heads", heads)):
            if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or not all(
                    isinstance(e, int) and not isinstance(e, bool) and e > 0 for e in v):
                raise ValueError(f"{name} must be a list with one positive integer per stage (e.g. depth=[10, 2]), "
                                 f"got {v!r}")
        if not (len(base_dims) == len(depth) == len(heads)) or not depth:
            raise ValueError(f"base_dims, depth and heads must have one (equal) length per stage, got "
                             f"{list(base_dims)}, {list(depth)}, {list(heads)}")
        n_stages = len(depth)
        mlp_types = [mlp_type] * n_stages if isinstance(mlp_type, str) else list(mlp_type)
        if len(mlp_types) != n_stages:
            raise ValueError(f"mlp_type must be a string or have {n_stages} entries, got {mlp_type!r}")
        for t in mlp_types:
            check_choice("mlp_type", t, MLP_TYPES)
        attention_kwargs = check_attention_kwargs(attention_kwargs)

        self.attention = attention
        self.base_dims = list(base_dims)
        self.heads = list(heads)
        self.num_classes = num_classes
        self.global_pool = global_pool
        widths = [b * h for b, h in zip(base_dims, heads)]
        self.num_features = self.head_hidden_size = self.embed_dim = widths[-1]

        self.patch_embed = ConvEmbedding(in_chans, widths[0])
        self.pos_drop = nn.Dropout(p=drop_rate)
        img_hw = to_2tuple(img_size)
        grid = tuple(ConvEmbedding.output_size(s) for s in img_hw)
        self.grid_sizes = []

        total = sum(depth)
        dpr = [drop_path_rate * i / total for i in range(total)]
        self.transformers = nn.ModuleList()
        self.pools = nn.ModuleList()
        start = 0
        for s in range(n_stages):
            self.grid_sizes.append(grid)
            attn_layer = attention_class(attention, grid_size=grid, num_prefix_tokens=0, **attention_kwargs)
            masked = partial(MaskedSelfAttention, num_tokens=grid[0] * grid[1]) if s == 0 and masked_blocks else None
            self.transformers.append(RVTStage(
                widths[s], depth[s], heads[s], attn_layer, mlp_ratio=mlp_ratio, mlp_type=mlp_types[s],
                qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[start:start + depth[s]], first_attn_layer=masked,
                first_blocks=masked_blocks if s == 0 else 0))
            start += depth[s]
            if s < n_stages - 1:
                pool = ConvHeadPooling(widths[s], widths[s + 1], stride=2)
                self.pools.append(pool)
                grid = tuple(pool.output_size(g) for g in grid)

        self.norm = nn.LayerNorm(widths[-1], eps=1e-6)
        self.head_drop = nn.Identity()
        self.head = nn.Linear(widths[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.num_stages = n_stages
        stem_reduction = 16  # 7x7/2 conv, 3x3/2 max-pool, 4x4/4 conv
        self.feature_info = [dict(num_chs=widths[s], reduction=stem_reduction * 2 ** s, module=f"transformers.{s}")
                             for s in range(n_stages)]

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise lr decay): the stem, then blocks (or stages) in order,
        each pooling after its stage, the final norm last."""
        if coarse:
            blocks = [(r"^transformers\.(\d+)", None), (r"^pools\.(\d+)", (99999,))]
        else:
            blocks = [(r"^transformers\.(\d+)\.blocks\.(\d+)", None), (r"^pools\.(\d+)", (99999,)),
                      (r"^norm", (99999,))]
        return dict(stem=r"^patch_embed", blocks=blocks)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        for stage in self.transformers:
            stage.grad_checkpointing = enable

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature API: the output map of each stage in ``indices`` (int: the last n stages).

        Returns the list of (B, C_s, h_s, w_s) maps (or NHWC), or (final map, list); ``norm`` applies the
        final LayerNorm (over channels) to the last stage's map."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.transformers), indices)
        intermediates = []
        x = self.pos_drop(self.patch_embed(x))
        last = len(self.transformers) - 1
        for s, stage in enumerate(self.transformers):
            if stop_early and s > max_index:
                break
            x = stage(x)
            if s in take:
                y = x
                if norm and s == self.num_stages - 1 and isinstance(self.norm, nn.LayerNorm):
                    y = self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                intermediates.append(y.permute(0, 2, 3, 1) if output_fmt == "NHWC" else y)
            if s < last:
                x = self.pools[s](x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one in ``indices`` (and the norm / head); returns the indices."""
        take, max_index = feature_take_indices(len(self.transformers), indices)
        self.transformers = self.transformers[:max_index + 1]
        self.pools = self.pools[:max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> final feature map (B, C_last, h_last, w_last)."""
        x = self.pos_drop(self.patch_embed(x))
        for stage, pool in zip(self.transformers, self.pools):
            x = pool(stage(x))
        return self.transformers[-1](x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or the normalised pooled features if pre_logits."""
        x = self.norm(x.mean(dim=(-2, -1)))
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({"vars_rvt_tiny": host_cfg(), "vars_rvt_small": host_cfg(),
                                     "vars_rvt_base": host_cfg()})


@register_model
def vars_rvt_tiny(pretrained: bool = False, **kwargs) -> PoolingTransformer:
    """RVT-Ti (official VARS host): widths 192/384, depth 10/2, heads 6/12, conv MLP, ~8.6M parameters.

    ``attention`` picks the token mixer ("self", "performer" = RVT*, "vars_s", "vars_d", "vars_sd");
    keywords not of :class:`PoolingTransformer` go to the attention layer (``lam``, ``steps`` /
    ``num_step``, ``solver``, ``grad``, ``rand_feat_dim_ratio``, ``compat``, ...). For the released
    checkpoints use ``attention="vars_d"`` or ``"vars_sd"`` with ``compat="official"``.
    """
    model_args = dict(base_dims=(32, 32), depth=(10, 2), heads=(6, 12), mlp_ratio=4., mlp_type="conv")
    return create_host(PoolingTransformer, "vars_rvt_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def vars_rvt_small(pretrained: bool = False, **kwargs) -> PoolingTransformer:
    """RVT-S (official ``rvt_small``): one stage, width 384 (base_dim 64 x 6 heads), depth 12, conv MLP."""
    model_args = dict(base_dims=(64,), depth=(12,), heads=(6,), mlp_ratio=4., mlp_type="conv")
    return create_host(PoolingTransformer, "vars_rvt_small", pretrained, **dict(model_args, **kwargs))


@register_model
def vars_rvt_base(pretrained: bool = False, **kwargs) -> PoolingTransformer:
    """RVT-B (official ``rvt_base``): one stage, width 768 (base_dim 64 x 12 heads), depth 12; the
    official code uses the plain two-layer MLP at width 768 (``mlp_type="linear"``)."""
    model_args = dict(base_dims=(64,), depth=(12,), heads=(12,), mlp_ratio=4., mlp_type="linear")
    return create_host(PoolingTransformer, "vars_rvt_base", pretrained, **dict(model_args, **kwargs))
