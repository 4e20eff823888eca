"""timm plumbing shared by the host entrypoints: default cfgs and ``build_model_with_cfg``."""
from __future__ import annotations

from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

from ._attention import check_attention_kwargs, split_model_kwargs

__all__ = ["create_host", "host_cfg"]


def host_cfg(**kwargs) -> Dict[str, Any]:
    """A timm pretrained cfg without weights (no download URL), ImageNet-1k preprocessing."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": .9, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj.0", "classifier": "head",
        "paper_ids": "arXiv:2204.10962",
        "paper_name": "Visual Attention Emerges from Recurrent Sparse Reconstruction",
        **kwargs,
    }


def create_host(model_cls, variant: str, pretrained: bool = False, **kwargs):
    """Build ``model_cls`` through timm's ``build_model_with_cfg``.

    Keywords of the model class go to it; the rest are collected into its ``attention_kwargs`` (the
    attention layer's options). ``pretrained=True`` needs a local file, e.g.
    ``pretrained_cfg_overlay=dict(file="checkpoint.pth")``; official key names are mapped on load.
    """
    from .checkpoint import official_filter_fn

    timm_kw = {k: kwargs.pop(k) for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir") if k in kwargs}
    model_kw, layer_kw = split_model_kwargs(model_cls, kwargs)
    if layer_kw:
        model_kw["attention_kwargs"] = {**check_attention_kwargs(model_kw.get("attention_kwargs")), **layer_kw}
    return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=official_filter_fn,
                                **timm_kw, **model_kw)
