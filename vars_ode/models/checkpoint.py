"""Loading checkpoints saved by the official VARS code (bfshi/VARS) into the vars_ode hosts.

The official ``main.py`` saves ``{"model": model_without_ddp.state_dict(), "optimizer": ..., ...}``
(possibly with a ``"model_ema"`` entry); a state dict taken from a DistributedDataParallel wrapper has
its keys prefixed with ``"module."``. :func:`load_official_checkpoint` accepts any of these (a path, the
whole dict, or a bare state dict), strips wrapper prefixes, renames official parameter names to ours
where they differ (:data:`OFFICIAL_RENAMES`), checks names and shapes against the model, and loads
strictly.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["OFFICIAL_RENAMES", "check_state_dict", "load_official_checkpoint", "official_filter_fn",
           "official_state_dict", "rename_official_keys"]

#: (regex on an official key, replacement) applied in order. The RVT host and the layer's
#: ``compat="official"`` mode use the official names, so nothing needs renaming today; a future
#: difference goes here and nowhere else.
OFFICIAL_RENAMES: Sequence[Tuple[str, str]] = ()

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ENTRIES = ("model", "model_ema", "state_dict", "state_dict_ema")


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def official_state_dict(checkpoint: Union[str, os.PathLike, Mapping[str, Any]], *,
                        key: str = "model") -> Dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint, with DDP/compile prefixes removed.

    Arguments:
        checkpoint: a path to a file written by ``torch.save``, the loaded dict, or a state dict.
        key: the entry to read when the checkpoint is a dict of entries: "model" (the official
            default), "model_ema", "state_dict" or "state_dict_ema".
    """
    if key not in _ENTRIES:
        raise ValueError(f"key must be one of {list(_ENTRIES)}, got {key!r}")
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
    if any(k in checkpoint for k in _ENTRIES):
        if key not in checkpoint:
            present = [k for k in _ENTRIES if k in checkpoint]
            raise ValueError(f"checkpoint has no entry {key!r}; it has {present}")
        state = checkpoint[key]
        if isinstance(state, nn.Module):  # a pickled model (e.g. an EMA wrapper's module)
            state = state.state_dict()
    else:
        state = checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("checkpoint entry is not a state dict (a mapping from names to tensors)")
    return {_strip_prefixes(k): v for k, v in state.items()}


def rename_official_keys(state_dict: Mapping[str, torch.Tensor],
                         renames: Sequence[Tuple[str, str]] = OFFICIAL_RENAMES) -> Dict[str, torch.Tensor]:
    """Apply the official -> vars_ode name rules to every key."""
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in renames:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _fmt_keys(keys: List[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming every missing key, unexpected key and shape mismatch."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched)}")
        hint = ""
        if any(".attn." in k for k in missing + unexpected):
            hint = (" (an official VARS checkpoint needs the same attention, e.g. attention='vars_d' or "
                    "'vars_sd', with compat='official', and the same img_size)")
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts) + hint)


def load_official_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]], *,
                             key: str = "model") -> nn.Module:
    """Load an official VARS checkpoint into ``model`` strictly; returns ``model``.

    Arguments:
        model: e.g. ``timm.create_model("vars_rvt_tiny", attention="vars_d", compat="official")``.
        checkpoint: path, the dict saved by the official ``main.py`` ({"model": state_dict, ...}),
            or a bare state dict; keys may carry a "module." (DDP) prefix.
        key: which entry of a checkpoint dict to load ("model" or "model_ema", ...).

    Raises:
        ValueError: naming the missing and unexpected keys and the mismatched shapes, if any.
    """
    state = rename_official_keys(official_state_dict(checkpoint, key=key))
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def official_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: official names -> ours (for ``pretrained_cfg_overlay=dict(file=...)``)."""
    return rename_official_keys({_strip_prefixes(k): v for k, v in state_dict.items()})
