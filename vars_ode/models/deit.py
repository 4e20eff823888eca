"""DeiT* (the paper's modified DeiT-Ti): timm's VisionTransformer with a convolutional stem and a
choice of attention.

DeiT-Ti: width 192, depth 12, 3 heads (head_dim 64), MLP ratio 4, class token, learned positional
embedding. The paper's starred baseline (Shi et al. 2022, Sec. 4) swaps the 16x16 patchify
convolution for the convolutional stem of Xiao et al. (2021) (:class:`ConvPatchEmbed`) and softmax
attention for Performer; VARS then replaces the attention. The class token is a prefix token: VARS
layers receive ``num_prefix_tokens=1`` so a static dictionary covers only the patch grid.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

from timm.layers import PatchEmbed, to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .._validation import check_choice
from ._attention import ATTENTIONS, attention_class, check_attention_kwargs
from ._factory import create_host, host_cfg
from .layers import ConvPatchEmbed

__all__ = ["DeiTStar", "vars_deit_tiny"]


class DeiTStar(VisionTransformer):
    """timm ``VisionTransformer`` whose attention is chosen by name and whose stem can be convolutional.

    Arguments:
        img_size, patch_size, embed_dim, depth, num_heads: as in timm (defaults: DeiT-Ti at 224 px).
        attention: one of "self", "performer", "vars_s", "vars_d", "vars_sd".
        attention_kwargs: keyword arguments of the attention layer (``lam``, ``steps``, ...).
        conv_stem: use :class:`ConvPatchEmbed` (True, the paper's DeiT*) or timm's ``PatchEmbed``.
        **kwargs: any other ``VisionTransformer`` keyword (num_classes, in_chans, drop_path_rate, ...).

    Shapes:
        forward: (B, in_chans, H, W) -> (B, num_classes).
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            attention: str = "vars_sd",
            attention_kwargs: Optional[Dict[str, Any]] = None,
            conv_stem: bool = True,
            class_token: bool = True,
            reg_tokens: int = 0,
            **kwargs,
    ) -> None:
        check_choice("attention", attention, ATTENTIONS)
        if "attn_layer" in kwargs or "embed_layer" in kwargs:
            raise ValueError("attn_layer and embed_layer are chosen by attention= and conv_stem=; do not pass them")
        img_hw = to_2tuple(img_size)
        p = to_2tuple(patch_size)
        # the grid the stem gives: timm's patchify drops a partial patch, the convolutional stem keeps it
        grid = ConvPatchEmbed.grid_for(img_hw, p) if conv_stem else (img_hw[0] // p[0], img_hw[1] // p[1])
        num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        attn_layer = attention_class(attention, grid_size=grid, num_prefix_tokens=num_prefix_tokens,
                                     **check_attention_kwargs(attention_kwargs))
        super().__init__(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            class_token=class_token, reg_tokens=reg_tokens, attn_layer=attn_layer,
            embed_layer=ConvPatchEmbed if conv_stem else PatchEmbed, **kwargs)
        self.attention = attention


default_cfgs = generate_default_cfgs({"vars_deit_tiny": host_cfg()})


@register_model
def vars_deit_tiny(pretrained: bool = False, **kwargs) -> DeiTStar:
    """DeiT-Ti* (width 192, depth 12, 3 heads, conv stem), ~5.7M parameters with Performer attention.

    ``attention`` picks "self", "performer" (= DeiT*), "vars_s", "vars_d" or "vars_sd"; keywords not of
    :class:`DeiTStar` / ``VisionTransformer`` go to the attention layer.
    """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, qkv_bias=True)
    return create_host(DeiTStar, "vars_deit_tiny", pretrained, **dict(model_args, **kwargs))
