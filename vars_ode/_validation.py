"""Argument checks shared by the public functions.

Every check raises ``ValueError`` naming the argument and what was expected, so that a
user sees at once which argument to fix.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: the dtypes the solvers iterate in (vo.solve, vo.solve_gram); half precision is cast up by the caller (a
#: layer under autocast iterates in float32)
SOLVE_DTYPES = (torch.float32, torch.float64)


def check_tensor(name: str, value, *, min_dim: int = 0) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {value.dtype}"
        )
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_broadcast(what: str = "leading dimensions", **shapes) -> torch.Size:
    """The broadcast of the named shapes (by default the arguments' leading dimensions, ``what``); a ``ValueError``
    naming each where they do not broadcast."""
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        listed = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items())
        raise ValueError(f"{what} must broadcast: {listed}") from None


def check_last(name: str, value: torch.Tensor, size: int, what: str, *, rows: bool = False) -> None:
    """``value``'s last dimension (its rows, dimension -2, with ``rows``) has ``size`` entries, else a ``ValueError``
    naming ``name`` and what sets the size (``what``, e.g. ``"P.shape[-2]"``)."""
    if value.shape[-2 if rows else -1] != size:
        where = "rows" if rows else "entries in its last dimension"
        raise ValueError(f"{name} must have {what} = {size} {where}, got shape {tuple(value.shape)}")


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def as_lam(lam, *, like: torch.Tensor, name: str = "lam") -> torch.Tensor:
    """Return ``lam`` as a tensor of ``like``'s dtype and device; reject negative values."""
    if isinstance(lam, torch.Tensor):
        if lam.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float or a floating-point tensor, got dtype {lam.dtype}")
        lam_t = lam.to(dtype=like.dtype, device=like.device)
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        lam_t = torch.tensor(float(lam), dtype=like.dtype, device=like.device)
    else:
        raise ValueError(f"{name} must be a non-negative float or tensor, got {type(lam).__name__}")
    # NaN marks a problem as non-finite (reported per problem); a negative value, -inf included, is an error
    if bool((lam_t < 0).any()):
        raise ValueError(f"{name} must be non-negative, got a minimum of {lam_t[lam_t < 0].min().item():g}")
    return lam_t


def check_positive(name: str, value, *, allow_none: bool = False, integer: bool = False):
    if value is None and allow_none:
        return value
    kind = "integer" if integer else "finite number"
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name} must be a positive {kind}" + (" or None" if allow_none else "") + f", got {value!r}")
    return value


def check_non_negative(name: str, value) -> float:
    """A finite real number >= 0 (a tolerance, a rate)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return value
