"""torch.hub entry points for the VARS host models.

    model = torch.hub.load("path/to/vars_ode", "vars_rvt_tiny", source="local", attention="vars_d")

Every entry point builds the timm model of the same name (keywords as in ``timm.create_model``:
``attention``, ``num_classes``, ``img_size``, the attention layer's options such as ``lam`` or
``compat="official"``). There are no weights to download: ``pretrained=True`` needs a local file,
``pretrained_cfg_overlay=dict(file="checkpoint.pth")`` (a vars_ode or official VARS checkpoint, read
weights-only).
"""
dependencies = ["torch", "torchvision", "timm", "torchdiffeq", "numpy", "scipy"]


def _create(name: str, pretrained: bool = False, **kwargs):
    import timm

    import vars_ode  # noqa: F401  (registers the hosts with timm)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def vars_deit_tiny(pretrained: bool = False, **kwargs):
    """DeiT-Ti* with a choice of attention (the paper's Table 2 host)."""
    return _create("vars_deit_tiny", pretrained, **kwargs)


def vars_rvt_tiny(pretrained: bool = False, **kwargs):
    """RVT-Ti as in the official VARS code (``rvt_tiny``); Table 2 host."""
    return _create("vars_rvt_tiny", pretrained, **kwargs)


def vars_gfnet_tiny(pretrained: bool = False, **kwargs):
    """GFNet-Ti* with its global filter or an attention (Table 2 host)."""
    return _create("vars_gfnet_tiny", pretrained, **kwargs)


def vars_rvt_small(pretrained: bool = False, **kwargs):
    """RVT-S (the official ``rvt_small`` shape)."""
    return _create("vars_rvt_small", pretrained, **kwargs)


def vars_rvt_base(pretrained: bool = False, **kwargs):
    """RVT-B (the official ``rvt_base`` shape)."""
    return _create("vars_rvt_base", pretrained, **kwargs)
