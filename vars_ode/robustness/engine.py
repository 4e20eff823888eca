"""Model construction and evaluation loops shared by the training and evaluation scripts.

* :func:`create_model` builds any timm-registered model, passing VARS options (``attention=``,
  ``lam=``, ``num_step=``, ...) only when given, and turns "unexpected keyword" errors into a message
  that says which option the model does not take.
* :func:`evaluate` computes top-1 accuracy on pixel-space batches, optionally restricted to a class
  subset (ImageNet-A/R) or under an attack (PGD/FGSM); sharded over ranks when torch.distributed is
  initialised.
* :func:`attention_maps` returns one (H', W') map per image: ``vars_ode.attention_maps`` when the
  library provides it, else a fallback computed from a forward hook on the last attention module
  (see its docstring).
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layer import EQUILIBRIUM

__all__ = ["VARS_MODELS", "VARS_ATTENTIONS", "create_model", "missing_vars_models", "evaluate",
           "attention_maps", "last_attention_module", "autocast"]

VARS_MODELS = ("vars_deit_tiny", "vars_rvt_tiny", "vars_gfnet_tiny")
VARS_ATTENTIONS = ("self", "performer", "vars_s", "vars_d", "vars_sd")
# model kwarg -> alternative spellings tried when a model rejects the first one
_ALIASES = {"num_step": ("num_step", "steps", "num_steps")}
# kwargs silently dropped when a model does not take them (not every timm model takes img_size)
_OPTIONAL = ("img_size", "drop_path_rate", "in_chans")


_IMPORT_ERRORS: list[str] = []


def _import_vars_models() -> None:
    """Import vars_ode (and vars_ode.models) so VARS hosts register with timm. A failure is kept
    and reported by :func:`create_model` only if a requested model turns out to be missing, so plain
    timm models keep working while vars_ode/models is absent or broken."""
    import importlib
    _IMPORT_ERRORS.clear()
    for mod in ("vars_ode", "vars_ode.models"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name not in (mod, "vars_ode.models"):
                _IMPORT_ERRORS.append(f"import {mod} failed: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - a half-written module must not break plain timm models
            _IMPORT_ERRORS.append(f"import {mod} failed: {type(e).__name__}: {e}")


def missing_vars_models(attentions: Sequence[str] = VARS_ATTENTIONS, model: str = "vars_deit_tiny",
                        **probe_kwargs) -> list[str]:
    """What is missing to build ``model`` with each attention: a list of human-readable problems
    (empty when everything can be instantiated with ``probe_kwargs``)."""
    import timm
    _import_vars_models()
    if not timm.is_model(model):
        return [f"timm model {model!r} is not registered (expected from `import vars_ode`, "
                "vars_ode/models/)" + "".join("; " + e for e in _IMPORT_ERRORS)]
    problems = []
    for att in attentions:
        try:
            create_model(model, attention=att, **probe_kwargs)
        except Exception as e:  # noqa: BLE001 - report any failure
            problems.append(f"{model}(attention={att!r}): {type(e).__name__}: {e}")
    return problems


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, img_size: int | None = None,
                 attention: str | None = None, drop_path_rate: float | None = None,
                 layer_kwargs: dict | None = None, pretrained: bool = False, **model_kwargs) -> nn.Module:
    """``timm.create_model(name, ...)`` passing only the options that are set.

    Arguments:
        name: a timm-registered model (VARS hosts register on ``import vars_ode``).
        attention: 'self', 'performer', 'vars_s', 'vars_d', 'vars_sd' ('gfnet' for GFNet); omitted
            when None.
        layer_kwargs: VARS layer options (lam, num_step, rand_feat_dim_ratio, solver, grad); None values are
            dropped; ``num_step`` is retried as ``steps`` / ``num_steps`` if the model rejects it.
        pretrained: timm's ``pretrained`` (the VARS hosts need a weight file:
            ``pretrained_cfg_overlay=dict(file=...)``).
        model_kwargs: any other timm keyword (patch_size, embed_dim, depth, ...).
    Raises:
        ValueError naming the model and the rejected option, or the keyword whose value the model
        could not be built with (e.g. ``patch_size='four'``).
    """
    import timm
    _import_vars_models()
    if not timm.is_model(name):
        hint = ""
        if name.startswith("vars_"):
            hint = (" VARS hosts (" + ", ".join(VARS_MODELS) + ") are registered by `import vars_ode` "
                    "from vars_ode/models/; that module is missing or failed to import." +
                    "".join(" " + e for e in _IMPORT_ERRORS))
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"model {name!r} is not registered with timm.{hint} Similar names: {close}")
    kwargs = dict(model_kwargs)
    if "steps" in kwargs and kwargs["steps"] is None:
        # timm.create_model drops keyword arguments whose value is None; for a VARS layer steps=None means "to the
        # equilibrium", spelt so that it reaches the layer
        kwargs["steps"] = EQUILIBRIUM
    kwargs["num_classes"] = num_classes
    kwargs["in_chans"] = in_chans
    if img_size is not None:
        kwargs["img_size"] = img_size
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if attention is not None:
        kwargs["attention"] = attention
    aliases = {}
    for k, v in (layer_kwargs or {}).items():
        if v is not None:
            kwargs[k] = v
            if k in _ALIASES:
                aliases[k] = list(_ALIASES[k][1:])
    while True:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if not m:
                raise _build_error(name, model_kwargs, e) from e
            bad = m.group(1)
            if bad in _OPTIONAL and bad in kwargs and bad not in model_kwargs:
                if bad == "in_chans" and in_chans != 3:
                    raise ValueError(f"model {name!r} does not accept in_chans={in_chans}") from e
                kwargs.pop(bad)
                continue
            origin = next((k for k, alts in aliases.items() if bad == k or bad in _ALIASES[k]), None)
            if origin is not None and aliases[origin]:
                value = kwargs.pop(bad)
                kwargs[aliases[origin].pop(0)] = value
                continue
            opt = "attention" if bad == "attention" else bad
            raise ValueError(
                f"model {name!r} does not accept {opt}={kwargs.get(bad)!r} (timm said: {e}). Options such "
                f"as --attention/--lam/--num_step/--rand_feat_dim_ratio/--solver/--grad need a VARS host model "
                f"({', '.join(VARS_MODELS)}); drop them for plain timm models.") from e
        except (AssertionError, ZeroDivisionError, RuntimeError) as e:
            if not model_kwargs:
                raise
            raise _build_error(name, model_kwargs, e) from e


def _build_error(name: str, model_kwargs: dict, e: Exception) -> ValueError:
    """A one-line error for a model that could not be built with the given keywords: name the keywords
    whose value has another type than the model's default (``patch_size='four'`` where 16 is expected)."""
    import inspect
    import timm
    suspects = []
    try:
        from timm.models import model_entrypoint
        sigs = [inspect.signature(model_entrypoint(name))]
        for mod in (getattr(timm.models, "vision_transformer", None),):
            if mod is not None and hasattr(mod, "VisionTransformer"):
                sigs.append(inspect.signature(mod.VisionTransformer.__init__))
        import vars_ode.models as vm
        for c in (vm.PoolingTransformer, vm.DeiTStar, vm.GFNetStar):
            sigs.append(inspect.signature(c.__init__))
        for k, v in model_kwargs.items():
            for sig in sigs:
                p = sig.parameters.get(k)
                if p is None or p.default is inspect.Parameter.empty or p.default is None:
                    continue
                d = p.default
                ok = isinstance(v, type(d)) or (isinstance(d, (int, float)) and isinstance(v, (int, float))
                                                and not isinstance(v, bool)) or (isinstance(d, (tuple, list))
                                                                                 and isinstance(v, (tuple, list)))
                if not ok:
                    suspects.append(f"{k}={v!r} (expected {type(d).__name__}, like the default {d!r})")
                break
    except Exception:  # noqa: BLE001 - the hint is best effort; the original error is reported anyway
        pass
    what = "; ".join(suspects) if suspects else ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items())
    return ValueError(f"model {name!r} could not be built with {what or 'these options'}: "
                      f"{type(e).__name__}: {' '.join(str(e).split())}")


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` for the device type when dtype is set, else a null context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _world():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
             class_indices: Sequence[int] | None = None, attack: Callable | None = None,
             max_batches: int | None = None, progress: str | None = None,
             keep_logits: bool = False) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on ``loader``'s (pixels in [0, 1], label) batches.

    Arguments:
        model: takes pixels (wrap a normalised-input model in ``NormalizedModel``); put in eval mode.
        class_indices: keep only these output classes (ImageNet-A/R 200-class protocol); labels are
            then positions in this list.
        attack: ``attack(model, images, labels) -> adversarial images`` (e.g. ``pgd_attack``), run with
            gradients enabled and in full precision.
        max_batches: stop after this many batches (quick checks).
        progress: show a tqdm bar with this description (None: no bar).
        keep_logits: also return this process's float32 logits (after the class subset) and labels,
            in loader order, as "logits" (N, K) and "targets" (N,) on the CPU.
    Returns:
        {"acc1": percent, "n": images, "correct": count}; counts are summed over ranks when
        torch.distributed is initialised (each rank must see its own shard of the data).
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    idx = None if class_indices is None else torch.as_tensor(list(class_indices), device=device)
    bar = None
    kept: list = []
    if progress is not None:
        from tqdm import tqdm
        bar = tqdm(total=len(loader) if max_batches is None else min(len(loader), max_batches), desc=progress,
                   leave=False, dynamic_ncols=True)
    for b, (images, labels) in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if attack is not None:
            images = attack(model, images, labels)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        if idx is not None:
            logits = logits.index_select(1, idx)
        correct += (logits.argmax(1) == labels).sum()
        total += labels.numel()
        if keep_logits:
            kept.append((logits.detach().cpu(), labels.detach().cpu()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    import torch.distributed as dist
    if _world()[1] > 1:
        dist.all_reduce(correct)
        dist.all_reduce(total)
    model.train(was_training)
    n = int(total.item())
    out = {"acc1": 100.0 * correct.item() / max(n, 1), "n": n, "correct": int(correct.item())}
    if keep_logits:
        out["logits"] = torch.cat([k[0] for k in kept]) if kept else torch.zeros(0, 0)
        out["targets"] = torch.cat([k[1] for k in kept]) if kept else torch.zeros(0, dtype=torch.long)
    return out


# ----------------------------------------------------------------------------------------------
# attention maps
# ----------------------------------------------------------------------------------------------
def last_attention_module(model: nn.Module) -> tuple[str, nn.Module]:
    """The last sub-module named ``attn``/``attention`` (timm blocks) or whose class name contains
    'Attention' or 'VARS'."""
    found = None
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        cls = type(mod).__name__
        if leaf in ("attn", "attention", "token_mixer", "filter") or "Attention" in cls or "VARS" in cls:
            found = (name, mod)
    if found is None:
        raise ValueError(f"no attention module found in {type(model).__name__}; pass a model with "
                         "blocks holding an `attn` module, or provide vars_ode.attention_maps")
    return found


def _prefix_tokens(model: nn.Module) -> int:
    m = getattr(model, "model", model)  # unwrap NormalizedModel
    return int(getattr(m, "num_prefix_tokens", 1 if getattr(m, "cls_token", None) is not None else 0))


def _to_grid(tokens_map: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """(B, N) per-token scores -> (B, h, w), dropping prefix tokens; h*w must be a square-ish grid."""
    t = tokens_map[:, n_prefix:]
    n = t.shape[1]
    h = int(math.isqrt(n))
    while h > 1 and n % h:
        h -= 1
    return t.reshape(t.shape[0], h, n // h)


def _library_maps(out, model) -> torch.Tensor | None:
    """Reduce ``vars_ode.attention_maps``' output to (B, h, w) or (B, H, W).

    It returns ``{module name: (B, T, N)}`` (per VARS layer, per solver iteration, per token): the
    last layer's last iteration is used, prefix tokens dropped, tokens reshaped to the grid.
    """
    if isinstance(out, dict):
        if not out:
            return None
        out = list(out.values())[-1]
        if out.ndim == 3:  # (B, T, N): last iteration
            out = out[:, -1]
    if not torch.is_tensor(out):
        return None
    if out.ndim == 2:  # (B, N) tokens
        return _to_grid(out.float(), _prefix_tokens(model))
    return out


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, size: tuple[int, int] | None = None,
                   normalize: bool = True) -> torch.Tensor:
    """(B, H, W) attention maps of ``images`` (whatever input ``model`` takes).

    Uses ``vars_ode.attention_maps(model, images)`` when it exists and the model has VARS layers
    (the last layer's map after the last solver iteration: mean over heads and channels of |P u| per
    token). Otherwise (fallback, documented in the scripts) a forward hook on the last attention
    module gives:

    * a timm ``Attention`` (has ``qkv`` and ``num_heads``): the softmax attention matrix recomputed
      from the hooked input, averaged over heads and over all query tokens ("the global average of
      tokens"), i.e. how much each key token is attended to on average;
    * any other module (VARS layers, token mixers): the L2 norm of its output at each token
      (spatial maps (B, C, h, w) are used as they are).

    Prefix (class) tokens are dropped, the token grid is resized bilinearly to ``size`` (default the
    image size) and each map is min-max normalised to [0, 1] when ``normalize``.
    """
    from ..layer import attention_maps as library_maps
    from .metrics import normalize_map
    size = tuple(size) if size is not None else tuple(images.shape[-2:])
    try:
        maps = _library_maps(library_maps(model, images), model)
    except ValueError:  # e.g. "model contains no VARSLayer": use the hook fallback
        maps = None
    if maps is None:
        name, mod = last_attention_module(model)
        store = {}

        def pre_hook(_m, args, kwargs):
            store["input"] = args[0] if args else next(iter(kwargs.values()))

        def hook(_m, _args, out):
            store["output"] = out[0] if isinstance(out, (tuple, list)) else out

        h1 = mod.register_forward_pre_hook(pre_hook, with_kwargs=True)
        h2 = mod.register_forward_hook(hook)
        was_training = model.training
        model.eval()
        try:
            model(images)
        finally:
            h1.remove()
            h2.remove()
            model.train(was_training)
        x = store["input"]
        if hasattr(mod, "qkv") and hasattr(mod, "num_heads") and x.ndim == 3:
            b, n, _ = x.shape
            heads = mod.num_heads
            qkv = mod.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            q = getattr(mod, "q_norm", nn.Identity())(q)
            k = getattr(mod, "k_norm", nn.Identity())(k)
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            attn = attn.float().softmax(-1)  # (B, heads, N, N)
            tok = attn.mean(dim=(1, 2))      # (B, N): average over heads and queries
            maps = _to_grid(tok, _prefix_tokens(model))
        else:
            out = store["output"].float()
            if out.ndim == 4:  # (B, C, h, w)
                maps = out.norm(dim=1)
            elif out.ndim == 3:  # (B, N, C)
                maps = _to_grid(out.norm(dim=-1), _prefix_tokens(model))
            else:
                raise ValueError(f"cannot turn the output {tuple(out.shape)} of {name} into a map")
    maps = maps.float()
    if maps.ndim == 4:
        maps = maps.mean(1)
    maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return normalize_map(maps) if normalize else maps
