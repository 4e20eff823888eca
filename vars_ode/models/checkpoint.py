"""Loading checkpoints saved by the official VARS code (bfshi/VARS) into the vars_ode hosts.

The official ``main.py`` saves ``{"model": model_without_ddp.state_dict(), "optimizer": ..., ...}``
(possibly with a ``"model_ema"`` entry); a state dict taken from a DistributedDataParallel wrapper has
its keys prefixed with ``"module."``. :func:`load_official_checkpoint` accepts any of these (a path, the
whole dict, or a bare state dict), strips wrapper prefixes, renames official parameter names to ours
where they differ (:data:`OFFICIAL_RENAMES`), checks names and shapes against the model, and loads
strictly.

Every checkpoint file of the project is read by :func:`load_checkpoint_file`: ``torch.load`` with
``weights_only=True`` (tensors, containers, numbers and strings only), with a short, explicit list of
extra types that the official and older vars_ode checkpoints hold (:data:`SAFE_GLOBALS`: argparse
namespaces and NumPy arrays, whose reconstruction runs no code of the file). A file that needs
anything else is refused with a :class:`CheckpointError` naming the file and the type; it loads only
with the explicit opt-in ``trusted=True`` (``--trust-checkpoint`` in the scripts). ``.safetensors``
files are read with safetensors.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

__all__ = ["CheckpointError", "OFFICIAL_RENAMES", "SAFE_GLOBALS", "check_state_dict", "load_checkpoint_file",
           "load_official_checkpoint", "official_filter_fn", "official_state_dict", "rename_official_keys",
           "save_safetensors"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, refused as unsafe, or does not fit the model."""


def _numpy_globals() -> list:
    """NumPy's array reconstruction (``np.random.get_state()`` of older checkpoints holds an array)."""
    out = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = __import__(mod, fromlist=["_reconstruct", "scalar"])
        except ImportError:
            continue
        out += [m._reconstruct, m.scalar]
        break
    # the dtype classes (np.dtypes.UInt32DType, ...) that pickles of NumPy >= 1.25 name
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


#: types allowed beyond torch's weights-only set: what official checkpoints (``"args"``: an argparse
#: Namespace) and earlier vars_ode checkpoints (NumPy random states) hold. None of them runs code
#: from the file when rebuilt.
SAFE_GLOBALS: List[Any] = [argparse.Namespace, *_numpy_globals()]


def _size(path: Path) -> str:
    try:
        n = path.stat().st_size
    except OSError:
        return "unreadable size"
    return f"{n:,} bytes"


def load_checkpoint_file(path: Union[str, os.PathLike], *, trusted: bool = False,
                         map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """Read a checkpoint file safely; the one loading function of the project.

    Arguments:
        path: a file written by ``torch.save`` (zip or legacy format) or a ``.safetensors`` file.
        trusted: load with ``weights_only=False`` (full pickle: the file can run any code). Only for
            files from a source you trust; the default refuses them with a :class:`CheckpointError`.
        map_location: as in ``torch.load``.
        what: how the file is named in error messages (e.g. ``"--resume"``).

    Raises:
        CheckpointError: one line naming the file (and its size): missing, a folder, empty,
            truncated or corrupt, or needing a type outside :data:`SAFE_GLOBALS` (with the way to load
            it knowingly).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device=str(map_location) if map_location is not None else "cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{what} {path} ({_size(path)}) is not a readable safetensors file: "
                                  f"{_first_line(e)}") from None
    try:
        if trusted:
            warnings.warn(f"loading {path} with weights_only=False (trusted=True): the file can run code",
                          stacklevel=2)
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"unsupported (?:global:? )?GLOBAL ([\w.]+)", msg, re.IGNORECASE)
        if m and not trusted:
            raise CheckpointError(
                f"{what} {path} ({_size(path)}) refers to {m.group(1)}, which weights-only loading refuses "
                f"(rebuilding it could run code from the file); if you trust the file, load it knowingly with "
                f"--trust-checkpoint (trusted=True in Python)") from None
        raise CheckpointError(f"{what} {path} ({_size(path)}) is corrupt or not a PyTorch checkpoint: "
                              f"{_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes torch.load raise (RuntimeError, EOFError,
        # zipfile.BadZipFile, struct.error from the weights-only unpickler on a cut-off opcode, ...): one kind of error
        raise CheckpointError(f"{what} {path} ({_size(path)}) is truncated or corrupt: "
                              f"{type(e).__name__}: {_first_line(e) or 'unexpected end of file'}") from None


def _first_line(e: BaseException) -> str:
    """The informative line of torch's multi-line load errors."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "WeightsUnpickler error" in ln:
            rest = ln.split("WeightsUnpickler error:", 1)[1].strip()
            text = rest or (lines[i + 1] if i + 1 < len(lines) else "")
            return ("unpickling failed: " + text)[:200]
    text = lines[0] if lines else ""
    return text.split(". This is an internal")[0][:200]


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict as a ``.safetensors`` file (shared storages copied apart)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata=dict(metadata or {}))

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
                        key: str = "model", trusted: bool = False) -> Dict[str, torch.Tensor]:
    """The state dict inside an official checkpoint, with DDP/compile prefixes removed.

    Arguments:
        checkpoint: a path to a file written by ``torch.save``, the loaded dict, or a state dict.
        key: the entry to read when the checkpoint is a dict of entries: "model" (the official
            default), "model_ema", "state_dict" or "state_dict_ema".
        trusted: passed to :func:`load_checkpoint_file` (full pickle; only for trusted files).
    """
    if key not in _ENTRIES:
        raise ValueError(f"key must be one of {list(_ENTRIES)}, got {key!r}")
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_checkpoint_file(checkpoint, trusted=trusted)
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


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], limit: int = 20,
                     what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` (a ValueError) naming the missing keys, unexpected keys and shape
    mismatches (the first ``limit`` of each, in key order), on one line."""
    expected = model.state_dict()
    # in the model's order (the checkpoint's for unexpected keys): the first ones named are the first
    # layers that differ
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt_keys(missing, limit)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected, limit)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched, limit)}")
        hint = ""
        if any(".attn." in k for k in missing + unexpected):
            hint = (" (an official VARS checkpoint needs the same attention, e.g. attention='vars_d' or "
                    "'vars_sd', with compat='official', and the same img_size)")
        raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts) + hint)


def load_official_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping[str, Any]], *,
                             key: str = "model", trusted: bool = False) -> nn.Module:
    """Load an official VARS checkpoint into ``model`` strictly; returns ``model``.

    Arguments:
        model: e.g. ``timm.create_model("vars_rvt_tiny", attention="vars_d", compat="official")``.
        checkpoint: path, the dict saved by the official ``main.py`` ({"model": state_dict, ...}),
            or a bare state dict; keys may carry a "module." (DDP) prefix.
        key: which entry of a checkpoint dict to load ("model" or "model_ema", ...).
        trusted: read a file that needs more than weights-only loading (it can run code).

    Raises:
        ValueError: naming the missing and unexpected keys and the mismatched shapes, if any.
    """
    state = rename_official_keys(official_state_dict(checkpoint, key=key, trusted=trusted))
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def official_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: official names -> ours (for ``pretrained_cfg_overlay=dict(file=...)``)."""
    return rename_official_keys({_strip_prefixes(k): v for k, v in state_dict.items()})
