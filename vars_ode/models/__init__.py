"""Host models for VARS attention, registered with timm, and official-checkpoint loading.

Importing this package registers these timm entrypoints:

- ``vars_deit_tiny``  (DeiT-Ti*, :class:`DeiTStar`),
- ``vars_rvt_tiny``   (RVT-Ti as in the official VARS code, :class:`PoolingTransformer`),
- ``vars_gfnet_tiny`` (GFNet-Ti*, :class:`GFNetStar`),
- ``vars_rvt_small``, ``vars_rvt_base`` (the official ``rvt_small`` / ``rvt_base`` shapes),

each built as ``timm.create_model(name, attention=..., num_classes=..., img_size=..., in_chans=...,
**layer_kwargs)`` with ``attention`` one of :data:`ATTENTIONS` (GFNet also "gfnet"). Keywords that are
not the host's go to the attention layer (``lam``, ``steps`` or ``num_step``, ``solver``, ``grad``,
``rand_feat_dim_ratio``, ``compat``, ...). VARS-S layers default to templates spanning the token grid
(as the official full-image templates); GFNet's "vars_s" is a projection-free static sparse coding
mixer in the global filter's slot (see :mod:`vars_ode.models.gfnet`).

:func:`load_official_checkpoint` loads a checkpoint of the official code (bfshi/VARS) into
``timm.create_model("vars_rvt_tiny", attention="vars_d" or "vars_sd", compat="official")``.
"""
from ._attention import ATTENTIONS, VARS_ATTENTIONS, attention_class
from .checkpoint import (OFFICIAL_RENAMES, SAFE_GLOBALS, CheckpointError, check_state_dict, load_checkpoint_file,
                         load_official_checkpoint, official_state_dict, save_safetensors)
from .deit import DeiTStar, vars_deit_tiny
from .gfnet import GFNET_MIXERS, GFNetBlock, GFNetStar, StaticSparseCoding, vars_gfnet_tiny
from .layers import ConvPatchEmbed, GlobalFilter
from .performer import MaskedSelfAttention, PerformerAttention, SelfAttention, positive_random_features
from .rvt import (MLP_TYPES, ConvEmbedding, ConvHeadPooling, ConvMlp, LinearMlp, PoolingTransformer, RVTBlock,
                  RVTStage, vars_rvt_base, vars_rvt_small, vars_rvt_tiny)

#: names of the registered timm entrypoints
MODEL_NAMES = ("vars_deit_tiny", "vars_rvt_tiny", "vars_gfnet_tiny")
#: further RVT sizes of the official code (rvt_small, rvt_base), outside the paper's Table 2
EXTRA_MODEL_NAMES = ("vars_rvt_small", "vars_rvt_base")

__all__ = [
    "ATTENTIONS", "EXTRA_MODEL_NAMES", "GFNET_MIXERS", "MLP_TYPES", "MODEL_NAMES", "OFFICIAL_RENAMES",
    "SAFE_GLOBALS", "VARS_ATTENTIONS", "CheckpointError", "ConvEmbedding", "ConvHeadPooling", "ConvMlp",
    "ConvPatchEmbed", "DeiTStar", "GFNetBlock", "GFNetStar", "GlobalFilter", "LinearMlp",
    "MaskedSelfAttention", "PerformerAttention", "PoolingTransformer", "RVTBlock", "RVTStage", "SelfAttention",
    "StaticSparseCoding", "attention_class", "check_state_dict", "load_checkpoint_file",
    "load_official_checkpoint", "official_state_dict", "positive_random_features", "save_safetensors",
    "vars_deit_tiny", "vars_gfnet_tiny", "vars_rvt_base", "vars_rvt_small", "vars_rvt_tiny",
]
