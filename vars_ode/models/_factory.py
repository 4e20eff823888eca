"""timm plumbing shared by the host entrypoints: default cfgs, ``build_model_with_cfg`` and weight files."""
from __future__ import annotations

from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

from ._attention import check_attention_kwargs, split_model_kwargs

__all__ = ["create_host", "host_cfg", "EVAL_CROP_PCT"]

#: the evaluation crop of the official code and of scripts/train_imagenet.py: resize to 256/224 of the
#: input side, centre crop (224 px from 256)
EVAL_CROP_PCT = 0.875

_FEATURE_KWARGS = ("features_only", "out_indices", "feature_cls", "feature_cfg", "output_fmt", "norm")


def host_cfg(**kwargs) -> Dict[str, Any]:
    """A timm pretrained cfg without weights (no download URL), ImageNet-1k preprocessing as evaluated."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": EVAL_CROP_PCT, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj.0", "classifier": "head",
        "paper_ids": "arXiv:2204.10962",
        "paper_name": "Visual Attention Emerges from Recurrent Sparse Reconstruction",
        **kwargs,
    }


def _weight_file(variant: str, pretrained_cfg, pretrained_cfg_overlay) -> str:
    from timm.models import resolve_pretrained_cfg
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    file = getattr(cfg, "file", None)
    if not file:
        raise ValueError(
            f"{variant} has no released weights to download; pass a local file (a vars_ode or official VARS "
            f"checkpoint, or .safetensors): timm.create_model({variant!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='checkpoint.pth')), or build with pretrained=False")
    return file


def create_host(model_cls, variant: str, pretrained: bool = False, **kwargs):
    """Build ``model_cls`` through timm's ``build_model_with_cfg``.

    Keywords of the model class go to it; the rest are collected into its ``attention_kwargs`` (the
    attention layer's options). ``features_only=True`` returns timm's feature extractor over
    ``forward_intermediates`` (``out_indices`` as in timm). ``pretrained=True`` needs a local file,
    ``pretrained_cfg_overlay=dict(file="checkpoint.pth")``: it is read weights-only
    (:func:`vars_ode.models.load_checkpoint_file`), official key names are mapped, and names and
    shapes are checked strictly, except a classifier of another size (``num_classes``), which keeps
    its initialisation.
    """
    timm_kw = {k: kwargs.pop(k) for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir") if k in kwargs}
    feat_kw = {k: kwargs.pop(k) for k in _FEATURE_KWARGS if k in kwargs}
    model_kw, layer_kw = split_model_kwargs(model_cls, kwargs)
    if layer_kw:
        model_kw["attention_kwargs"] = {**check_attention_kwargs(model_kw.get("attention_kwargs")), **layer_kw}
    file = _weight_file(variant, timm_kw.get("pretrained_cfg"), timm_kw.get("pretrained_cfg_overlay")) \
        if pretrained else None
    # default feature indices: every RVT stage; the last three blocks of the single-stage hosts (as timm's ViT)
    depth = model_kw.get("depth", 3)
    if model_cls.__name__ == "PoolingTransformer":  # one depth per stage (the model checks the values)
        default_out = len(depth) if hasattr(depth, "__len__") else 1
    else:
        default_out = min(3, int(depth))
    feature_cfg = {"feature_cls": "getter", "out_indices": default_out, **feat_kw.pop("feature_cfg", {})}
    features_only = feat_kw.pop("features_only", False)
    feature_cfg.update(feat_kw)
    model = build_model_with_cfg(model_cls, variant, False, feature_cfg=feature_cfg, **timm_kw, **model_kw)
    if file is not None:
        _load_file(model, file)
    if features_only:
        from timm.models._features import FeatureGetterNet
        cfg = model.pretrained_cfg
        feature_cfg.pop("feature_cls")
        model = FeatureGetterNet(model, **feature_cfg)
        model.pretrained_cfg = model.default_cfg = cfg
    return model


def _load_file(model, file) -> None:
    from .checkpoint import check_state_dict, load_checkpoint_file, official_state_dict, rename_official_keys
    ckpt = load_checkpoint_file(file, what="pretrained file")
    state = rename_official_keys(official_state_dict(ckpt, key="model" if isinstance(ckpt, dict) and "model" in ckpt
                                                     else "state_dict") if isinstance(ckpt, dict) and
                                 any(k in ckpt for k in ("model", "state_dict")) else official_state_dict(ckpt))
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier", "head")
    for k in [k for k in state if k.startswith(head + ".") and k in own and state[k].shape != own[k].shape]:
        del state[k]  # another number of classes: the head keeps its initialisation (as timm does)
    kept_head = {k: own[k] for k in own if k.startswith(head + ".") and k not in state}
    check_state_dict(model, {**state, **kept_head}, limit=5, what=f"pretrained file {file}")
    model.load_state_dict(state, strict=False)
